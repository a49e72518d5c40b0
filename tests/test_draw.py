"""EntityImagePipeline and `mmrag draw` on tiny models: retrieval feeds the generator exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmrag.generators import ReferenceDiffusionGenerator
from mmrag.pipelines.cli import main
from mmrag.pipelines.draw import EntityImagePipeline
from mmrag.pipelines.outputs import contact_sheet
from mmrag.retrievers import ConfigError, DualEncoder, KnowledgeBase, MultimodalRetriever, Record

STEPS = 3


def _shape(colour, box) -> Image.Image:
    im = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(im).ellipse(box, fill=colour)
    return im


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tiny_clip):
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("draw") / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id="chortai-1", text="a Chortai dog, side view", image=_shape((150, 90, 40), (4, 8, 28, 26))),
            Record(id="chortai-2", text="a Chortai dog running", image=_shape((140, 80, 30), (2, 4, 30, 30))),
            Record(id="boat", text="a red boat on a lake", image=_shape((220, 20, 20), (8, 8, 24, 24))),
            Record(id="tower", text="a stone tower", image=_shape((90, 90, 90), (12, 2, 20, 30)))])
    return kb


@pytest.fixture(scope="module")
def generator(tiny_sd):
    sd, ip = tiny_sd
    return ReferenceDiffusionGenerator(sd, ip_adapter=ip, guidance={"name": "interleaved", "text_scale": 5.0,
                                                                    "reference_scale": 2.0, "eta": 0.5}).warm_up()


def test_retrieved_references_condition_the_generation(kb, generator):
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None)  # the tiny encoder sees both dogs as one
    default = EntityImagePipeline(generator, retriever)("a Chortai dog", k=3, num_inference_steps=STEPS, seed=3)
    expected = [h.id for h in retriever.retrieve("a Chortai dog", k=3, channels=["text_to_image", "lexical"])]
    assert [h.id for h in default.references] == expected  # the default channels: text -> image and lexical
    # with the random tiny encoder only the lexical channel is meaningful: it finds the rare name
    pipe = EntityImagePipeline(generator, retriever, channels=["lexical"])
    out = pipe("a Chortai dog on a beach", k=2, num_inference_steps=STEPS, seed=3)
    assert {h.id for h in out.references} == {"chortai-1", "chortai-2"}
    # the same images fed straight to the generator with the same seed give the same picture
    direct = generator("a Chortai dog on a beach", [h.record.open_image() for h in out.references],
                       num_inference_steps=STEPS, seed=3)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(direct.images[0]))
    assert out.guidance == {"name": "interleaved", "text_scale": 5.0, "reference_scale": 2.0, "eta": 0.5}
    assert out.fallback is None and set(out.timings) >= {"retrieve", "generate"}
    # and they matter: other references, other picture
    other = generator("a Chortai dog on a beach", [kb.get("boat")[0].open_image()], num_inference_steps=STEPS, seed=3)
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(other.images[0]))


def test_given_references_need_no_kb_and_guidance_names_keep_configured_scales(generator):
    pipe = EntityImagePipeline(generator)  # no knowledge base
    refs = [_shape((10, 200, 10), (4, 4, 28, 28))]
    out = pipe("a green ball", references=refs, guidance="joint", num_inference_steps=STEPS, seed=1)
    assert out.guidance == {"name": "joint", "text_scale": 5.0, "reference_scale": 2.0}
    assert [h.id for h in out.references] == ["given-1"] and out.generation.rows_per_step == [3] * STEPS
    cfg = pipe("a green ball", references=refs, guidance="cfg", num_inference_steps=STEPS, seed=1)
    assert cfg.guidance == {"name": "cfg", "scale": 5.0}
    empty = pipe("a green ball", references=[], num_inference_steps=STEPS, seed=1)
    assert empty.references == [] and "classifier-free guidance" in empty.fallback
    with pytest.raises(ConfigError, match="knowledge base"):
        pipe("a green ball")
    with pytest.raises(ConfigError, match=r"references\[0\]"):
        pipe("a green ball", references=["not an image"])
    with pytest.raises(ConfigError, match="prompt"):
        pipe("  ", references=refs)
    with pytest.raises(ConfigError, match="`k`"):
        pipe("x", k=0, references=refs)


def test_contact_sheet_places_references_then_results():
    refs = [Image.new("RGB", (10, 10), (255, 0, 0))]
    outs = [Image.new("RGB", (20, 10), (0, 0, 255))]
    sheet = np.asarray(contact_sheet(refs, outs, height=10))
    assert sheet.shape == (10, 10 + 4 + 24 + 20 + 4, 3)
    assert tuple(sheet[5, 2]) == (255, 0, 0) and tuple(sheet[5, 10 + 4 + 24 + 2]) == (0, 0, 255)


def test_cli_draw_writes_images_sheet_and_json(tmp_path, kb, tiny_models_dir, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\nvlm:\n  model: tiny:llava\ndiffusion:\n  model: tiny:sd\n"
                   f"  ip_adapter: tiny:ip-adapter\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    out = tmp_path / "out" / "dog.png"
    code = main(["draw", "a Chortai dog", "--kb", str(kb.path), "--config", str(cfg), "--steps", "2", "--seed", "0",
                 "-o", str(out), "--num-images", "2", "--json", "--html", str(tmp_path / "draw.html")])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["images"] == [str(out), str(out.with_name("dog-1.png"))]
    assert all(Image.open(p).size == Image.open(res["images"][0]).size for p in res["images"])
    assert Image.open(res["contact_sheet"]).width > Image.open(res["images"][0]).width * 2
    assert [r["id"] for r in res["references"]] and res["guidance"]["name"] == "interleaved"
    page = (tmp_path / "draw.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 + len(res["references"])
    code = main(["draw", "a dog", "--config", str(cfg)])
    assert code == 2 and "--reference" in capsys.readouterr().err


def test_eval_generation_scores_equal_clip_cosines(tmp_path, kb, generator, tiny_models_dir, capsys):
    from mmrag.pipelines.evaluation import evaluate_generation, load_generation_prompts

    held = tmp_path / "held.png"
    _shape((145, 85, 35), (3, 6, 29, 28)).save(held)
    prompts = tmp_path / "mmrag.prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a Chortai dog", "entity": "Chortai", "images": ["held.png"],
                                   "bucket": "rare"}) + "\n")
    items = load_generation_prompts(prompts)
    pipe = EntityImagePipeline(generator, MultimodalRetriever(kb), channels=["lexical"])
    summary = evaluate_generation(pipe, items, kb.embedder, k=2, num_inference_steps=STEPS, seed=5)
    assert set(summary["per_guidance"]) == {"cfg", "joint", "interleaved"}
    # recompute one guidance by hand: same references, same seed
    refs = [h.record.open_image() for h in pipe("a Chortai dog", k=2, num_inference_steps=STEPS, seed=5).references]
    joint = pipe("a Chortai dog", references=refs, guidance="joint", num_inference_steps=STEPS, seed=5).images[0]
    v = kb.embedder.embed_images([joint])[0]
    t = kb.embedder.embed_texts(["a Chortai dog"])[0]
    h = kb.embedder.embed_images([Image.open(held).convert("RGB")])[0]
    got = summary["per_guidance"]["joint"]["per_bucket"]["rare"]
    assert got["clip_t"] == pytest.approx(float(v @ t), abs=1e-5) and got["clip_i"] == pytest.approx(float(v @ h), abs=1e-5)
    # the guidances really differ (same seed, same references)
    assert summary["per_guidance"]["cfg"]["clip_i"] != summary["per_guidance"]["joint"]["clip_i"]

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ndiffusion:\n  model: tiny:sd\n  ip_adapter: tiny:ip-adapter\n"
                   f"draw:\n  channels: [lexical]\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    code = main(["eval", "generation", "--kb", str(kb.path), "--prompts", str(prompts), "--config", str(cfg),
                 "--steps", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_prompts"] == 1 and set(out["per_guidance"]) == {"cfg", "joint", "interleaved"}
