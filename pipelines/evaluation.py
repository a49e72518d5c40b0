"""Retrieval evaluation: Recall@k, hit@k, MRR, nDCG@10 and mAP@50, per category and per channel.

Queries file (JSONL), one object per line::

    {"text": "...", "image": "relative/or/absolute.jpg", "relevant": ["id1", "id2"], "category": "dogs"}

``text`` and/or ``image`` form the query (an image path is relative to the file's folder);
``relevant`` lists the ids that count as correct; ``category`` is optional, and so is
``reference_text`` (a description of the image, for the composed method PDV).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmrag.retrievers import CHANNELS, ConfigError, Query

K_VALUES = (1, 5, 10)
HIT_K_VALUES = (1, 5)  # success@k: with several relevant ids, recall@1 cannot reach 1 and hit@1 can
DEPTH = 50  # hits fetched per query: enough for mAP@50


@dataclass
class EvalQuery:
    query: Query
    relevant: set[str]
    category: str = "all"
    line: int = 0


# ---------------------------------------------------------------------------- metrics
def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant ids found in the top ``k``."""
    return len(set(ranked[:k]) & relevant) / len(relevant)


def hit_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """1 when a relevant id is in the top ``k`` (success@k; the composed-retrieval papers' hit@k)."""
    return float(bool(set(ranked[:k]) & relevant))


def reciprocal_rank(ranked: Sequence[str], relevant: set[str]) -> float:
    return next((1.0 / r for r, i in enumerate(ranked, start=1) if i in relevant), 0.0)


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Binary-relevance nDCG: ``sum rel_i / log2(i+1)`` over the ideal ordering's value."""
    dcg = sum(1.0 / math.log2(r + 1) for r, i in enumerate(ranked[:k], start=1) if i in relevant)
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def average_precision_at(ranked: Sequence[str], relevant: set[str], k: int = 50) -> float:
    """``(1 / min(|rel|, k)) * sum_{i<=k, rel_i} precision@i``."""
    hits, total = 0, 0.0
    for r, i in enumerate(ranked[:k], start=1):
        if i in relevant:
            hits += 1
            total += hits / r
    return total / min(len(relevant), k)


def score_ranking(ranked: Sequence[str], relevant: set[str]) -> dict[str, float]:
    out = {f"recall@{k}": recall_at(ranked, relevant, k) for k in K_VALUES}
    out.update({f"hit@{k}": hit_at(ranked, relevant, k) for k in HIT_K_VALUES})
    out["mrr"] = reciprocal_rank(ranked, relevant)
    out["ndcg@10"] = ndcg_at(ranked, relevant, 10)
    out["map@50"] = average_precision_at(ranked, relevant, 50)
    return out


def mean_metrics(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    rows = list(rows)
    return {m: sum(r[m] for r in rows) / len(rows) for m in rows[0]} if rows else {}



def _jsonl(path: str | Path, argument: str):
    """``(line number, object, "file:line")`` for each non-blank line of a JSONL file; errors name
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"`{argument}` {str(path)!r} does not exist; pass a JSONL file.")
    found = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path}:{n} is not valid JSON ({e}).") from None
        found = True
        yield n, obj, f"{path}:{n}"
    if not found:
        raise ConfigError(f"{path} holds no lines.")


# ---------------------------------------------------------------------------- evaluation
def load_queries(path: str | Path) -> list[EvalQuery]:
    path = Path(path)
    out = []
    for n, obj, where in _jsonl(path, "--queries"):
        relevant = obj.get("relevant") if isinstance(obj, dict) else None
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) for r in relevant):
            raise ConfigError(f"{where}: `relevant` must be a non-empty list of record ids, got {relevant!r}.")
        image = obj.get("image")
        if image is not None:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
        try:
            query = Query.coerce(Query(text=obj.get("text"), image=image, reference_text=obj.get("reference_text")))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        out.append(EvalQuery(query, set(relevant), str(obj.get("category", "all")), n))
    return out


@dataclass
class RetrievalReport:
    overall: dict[str, float]
    per_category: dict[str, dict[str, float]]
    per_channel: dict[str, dict[str, float]]  # each channel alone, on the queries it can serve
    n_queries: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    # each channel alone, per category: which channel serves which kind of query
    per_channel_category: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n_queries": self.n_queries, "overall": self.overall, "per_category": self.per_category,
                "per_channel": self.per_channel, "per_channel_category": self.per_channel_category}

    def table(self) -> str:
        metrics = list(self.overall)
        lines = ["| setting | n | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]

        def row(name: str, values: dict[str, float], n: Any) -> str:
            return f"| {name} | {n} | " + " | ".join(f"{values[m]:.3f}" for m in metrics) + " |"

        lines.append(row("all channels (fused)", self.overall, self.n_queries))
        for cat, values in sorted(self.per_category.items()):
            lines.append(row(f"category: {cat}", values, values.get("n", "")))
        for ch, values in self.per_channel.items():
            lines.append(row(f"channel: {ch}", values, values.get("n", "")))
        if len(self.per_category) > 1:
            for ch, cats in self.per_channel_category.items():
                for cat, values in sorted(cats.items()):
                    lines.append(row(f"channel: {ch}, category: {cat}", values, values.get("n", "")))
        return "\n".join(lines)


def evaluate_retrieval(retriever, queries: Sequence[EvalQuery], *, where: dict | None = None,
                       ablate_channels: bool = True, progress=None) -> RetrievalReport:
    """Run every query through ``retriever`` (a :class:`MultimodalRetriever` or a
    :class:`~mmrag.pipelines.search.SearchPipeline`) and score the rankings; with
    ``ablate_channels``, again through each channel alone. ``progress(done, total)`` is called
    after every query run."""
    base = getattr(retriever, "retriever", retriever)  # a SearchPipeline's own retriever

    def served(ch: str) -> bool:  # e.g. late_interaction only on a KB with that index
        return not hasattr(base, "channel") or base.channel(ch).unavailable() is None

    usable = {ch: [q for q in queries if (q.query.has_text or not needs_text) and (q.query.has_image or not needs_image)]
              for ch, (needs_text, needs_image) in CHANNELS.items() if served(ch)} if ablate_channels else {}
    total = len(queries) + sum(len(u) for u in usable.values())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    rows, per_cat = [], {}
    for q in queries:
        ranked = [h.id for h in retriever.retrieve(q.query, k=DEPTH, where=where)]
        scores = score_ranking(ranked, q.relevant)
        rows.append({"line": q.line, "category": q.category, **scores})
        per_cat.setdefault(q.category, []).append(scores)
        tick()
    per_channel: dict[str, dict[str, float]] = {}
    per_channel_category: dict[str, dict[str, dict[str, float]]] = {}
    for ch, qs in usable.items():
        if not qs:
            continue
        ch_rows, by_category = [], {}
        for q in qs:
            scores = score_ranking([h.id for h in retriever.retrieve(q.query, k=DEPTH, where=where, channels=[ch])],
                                   q.relevant)
            ch_rows.append(scores)
            by_category.setdefault(q.category, []).append(scores)
            tick()
        per_channel[ch] = {**mean_metrics(ch_rows), "n": len(qs)}
        per_channel_category[ch] = {c: {**mean_metrics(v), "n": len(v)} for c, v in by_category.items()}
    per_category = {c: {**mean_metrics(v), "n": len(v)} for c, v in per_cat.items()}
    return RetrievalReport(mean_metrics(r for r in ({k: v for k, v in row.items() if k not in ("line", "category")}
                                                     for row in rows)),
                           per_category, per_channel, len(queries), rows, per_channel_category)


# ---------------------------------------------------------------------------- VQA
VQA_SETTINGS = ("no_retrieval", "gold", "retrieved")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles (the VQA benchmark's normalisation, simplified)."""
    import re

    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: ``min(1, #annotators who gave the prediction / min(3, #annotators))``: VQA's
    three-agreeing-annotators rule over ten answers, and exact match when there are fewer than three."""
    p = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == p for a in answers) / min(3.0, len(answers)))


@dataclass
class VQAItem:
    question: str
    image: Path | None
    answers: list[str]  # free-text gold answers (one or many annotators)
    choices: list[str] | None
    gold_choice: str | None
    gold_ids: list[str]
    category: str
    line: int


def load_vqa_dataset(path: str | Path) -> list[VQAItem]:
    """JSONL lines: ``image``, ``question``, ``answers`` (list) or ``choices`` + ``answer``,
    optional ``gold_ids`` (reference record ids) and ``category``."""
    path = Path(path)
    items = []
    for n, obj, where in _jsonl(path, "--dataset"):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise ConfigError(f"{where}: needs a non-empty `question`.")
        choices, answers = obj.get("choices"), obj.get("answers", obj.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if choices is not None and (not isinstance(choices, list) or len(choices) < 2 or obj.get("answer") not in choices):
            raise ConfigError(f"{where}: `choices` must list >= 2 options and `answer` must be one of them.")
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"{where}: needs `answers` (a list of strings) or `answer`.")
        image = obj.get("image")
        if image is not None:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
            if not image.is_file():
                raise ConfigError(f"{where}: image {str(image)!r} does not exist.")
        items.append(VQAItem(obj["question"], image, answers, choices, obj.get("answer") if choices else None,
                             list(obj.get("gold_ids", [])), str(obj.get("category", "all")), n))
    return items


def vqa_runs(items: Sequence[VQAItem]) -> list[tuple[VQAItem, str, list[str] | None]]:
    """``(item, setting, references)`` for every run the three settings make: ``references`` is
    ``[]`` (no retrieval), the item's ``gold_ids`` (gold; only items that have them), or None
    (retrieved)."""
    runs = []
    for item in items:
        for setting in VQA_SETTINGS:
            if setting == "gold" and not item.gold_ids:
                continue
            runs.append((item, setting, {"no_retrieval": [], "gold": list(item.gold_ids)}.get(setting)))
    return runs


def records_in_order(kb, ids: Sequence[str]) -> list:
    """``kb``'s records of ``ids``, in that order (the prompt's); a missing id is a ConfigError."""
    found = {r.id: r for r in kb.get(list(ids))} if ids else {}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ConfigError(f"`references` {missing} are not in the knowledge base; give ids of stored records.")
    return [found[i] for i in ids]


def check_gold_ids(kb, items: Sequence[VQAItem]) -> None:
    """The gold setting needs every ``gold_ids`` record in ``kb`` (None: no KB to take them from)."""
    wanted = sorted({i for item in items for i in item.gold_ids})
    if not wanted:
        return
    if kb is None:
        raise ConfigError("The gold-references setting needs the knowledge base holding `gold_ids`.")
    found = {r.id for r in kb.get(wanted)}
    for item in items:
        missing = sorted(set(item.gold_ids) - found)
        if missing:
            raise ConfigError(f"line {item.line}: gold_ids {missing} are not in the knowledge base.")


def vqa_row(item: VQAItem, setting: str, answer: str, choice: str | None, references: list[str],
            cited: list[str]) -> dict[str, Any]:
    """One prediction, scored: multiple-choice accuracy when the item has choices, else VQA soft
    accuracy (which equals exact match with one gold answer)."""
    score = float(choice == item.gold_choice) if item.choices else vqa_soft_accuracy(answer, item.answers)
    return {"line": item.line, "setting": setting, "category": item.category, "question": item.question,
            "prediction": answer, "score": score, "references": references, "cited": cited}


def vqa_summary(items: Sequence[VQAItem], rows: Sequence[dict[str, Any]],
                predictions_path: str | Path | None = None) -> dict[str, Any]:
    """Overall and per-category means per setting; ``rows`` go to ``predictions_path`` as JSONL."""
    if predictions_path is not None:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary: dict[str, Any] = {"n_items": len(items), "metric": "accuracy", "overall": {}, "per_category": {}}
    for setting in VQA_SETTINGS:
        srows = [r for r in rows if r["setting"] == setting]
        if not srows:
            continue
        summary["overall"][setting] = {"accuracy": sum(r["score"] for r in srows) / len(srows), "n": len(srows)}
        for cat in sorted({r["category"] for r in srows}):
            crow = [r["score"] for r in srows if r["category"] == cat]
            summary["per_category"].setdefault(cat, {})[setting] = {"accuracy": sum(crow) / len(crow), "n": len(crow)}
    return summary


def evaluate_vqa(pipeline, items: Sequence[VQAItem], *, k: int | None = None, predictions_path: str | Path | None = None,
                 progress=None) -> dict[str, Any]:
    """Score ``pipeline`` in the three MRAG-Bench settings: no retrieval, gold references, retrieved.

    Metric per item: multiple-choice accuracy when the item has choices, else VQA soft accuracy
    (which equals exact match with one gold answer). Returns overall and per-category means per
    setting; predictions go to ``predictions_path`` as JSONL. ``mmrag eval vqa --ray`` runs the same
    runs on a Ray actor pool (:func:`mmrag.pipelines.scale.batch_eval.evaluate_vqa_batch`).
    """
    kb = pipeline.retriever.kb if pipeline.retriever is not None else None
    check_gold_ids(kb, items)
    rows = []
    done = 0
    for item, setting, references in vqa_runs(items):
        refs = records_in_order(kb, references) if references else references
        out = pipeline(item.question, image=item.image, k=k, references=refs, choices=item.choices)
        rows.append(vqa_row(item, setting, out.answer, out.choice, [h.id for h in out.references],
                            [h.id for h in out.cited]))
        if progress is not None and setting == "retrieved":
            done += 1
            progress(done)
    return vqa_summary(items, rows, predictions_path)


def vqa_table(summary: dict[str, Any]) -> str:
    settings = [s for s in VQA_SETTINGS if s in summary["overall"]]
    lines = ["| | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    cell = lambda d, s: f"{d[s]['accuracy']:.3f} (n={d[s]['n']})" if s in d else "-"
    lines.append("| overall | " + " | ".join(cell(summary["overall"], s) for s in settings) + " |")
    for cat, d in summary["per_category"].items():
        lines.append(f"| {cat} | " + " | ".join(cell(d, s) for s in settings) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- generation
GUIDANCE_NAMES = ("cfg", "joint", "interleaved")
# Not a guidance object: plain CFG with no references at all, the text-only baseline (issue #14's
# "cfg (no references)"). The "cfg" setting above keeps the references in its conditional row.
TEXT_ONLY = "text_only"


@dataclass
class GenerationItem:
    prompt: str
    entity: str
    images: list[Path]  # held-out images of the entity (not in the KB)
    bucket: str
    line: int
    attributes: dict[str, str] | None = None  # the entity's known attributes, for an attribute judge


def load_generation_prompts(path: str | Path) -> list[GenerationItem]:
    """JSONL lines: ``prompt``, ``entity``, ``images`` (held-out image paths, relative to the file),
    optional ``bucket`` (e.g. "frequent" / "rare", EntityDrawBench style) and ``attributes`` (the
    entity's ``{slot: value}``, e.g. ``{"shape": "star", "colour": "red"}``, what a judge checks)."""
    path = Path(path)
    items = []
    for n, obj, where in _jsonl(path, "--prompts"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ConfigError(f"{where}: needs a non-empty `prompt`.")
        images = obj.get("images")
        if not isinstance(images, list) or not images:
            raise ConfigError(f"{where}: `images` must list held-out images of the entity.")
        paths = [Path(p) if Path(p).is_absolute() else path.parent / p for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"{where}: images {missing} do not exist.")
        attributes = obj.get("attributes")
        if attributes is not None and (not isinstance(attributes, dict) or not attributes or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in attributes.items())):
            raise ConfigError(f"{where}: `attributes` must map slot names to values, e.g. "
                              f'{{"shape": "star", "colour": "red"}}, got {attributes!r}.')
        items.append(GenerationItem(obj["prompt"], str(obj.get("entity", "")), paths, str(obj.get("bucket", "all")), n,
                                    attributes))
    return items


def check_judge_items(items: Sequence[GenerationItem], judge) -> None:
    """Before anything is drawn: every item names ``attributes`` that ``judge`` can read."""
    for item in items:
        if item.attributes is None:
            raise ConfigError(f"line {item.line}: no `attributes`; an attribute judge needs each entity's attributes "
                              "(e.g. the prompts of `python -m mmrag.pipelines.toyworld.bench_generation DIR`), "
                              "or leave out the judge.")
        judge.check_attributes(item.attributes, f"line {item.line}: `attributes`")


def guidance_grid(configured: dict[str, Any], names: Sequence[str] | None = None,
                  etas: Sequence[float] | None = None) -> list[str | dict[str, Any]]:
    """The settings to compare: ``names`` (guidance names or :data:`TEXT_ONLY`; ``None`` is
    :data:`GUIDANCE_NAMES`), with "interleaved"
    replaced by interleaved at each of ``etas`` at the ``configured`` guidance's scales (``draw.guidance``
    of a config), so that only the share of text-enhanced steps differs. Every guidance is checked here,
    before anything is drawn."""
    from mmrag.generators import guidance_from_config

    names = GUIDANCE_NAMES if names is None else names
    valid = (TEXT_ONLY, *GUIDANCE_NAMES)
    bad = [n for n in names if n not in valid]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(f"`guidances` must be distinct names among {', '.join(valid)}, got {list(names)!r}.")
    if etas is not None and "interleaved" not in names:
        raise ConfigError("`eta` sets interleaved guidance's share of text-enhanced steps: add interleaved to the "
                          f"guidances, got {list(names)!r}.")
    if etas is not None and (not etas or len(set(etas)) != len(etas)):
        raise ConfigError(f"`eta` must list distinct values in [0, 1], got {list(etas)!r}.")
    text_scale = configured.get("text_scale", configured.get("scale"))
    scales = {k: v for k, v in (("text_scale", text_scale), ("reference_scale", configured.get("reference_scale")))
              if v is not None}
    grid: list[str | dict[str, Any]] = []
    for name in names:
        if name == "interleaved" and etas is not None:
            for eta in etas:
                spec = {"name": "interleaved", **scales, "eta": eta}
                guidance_from_config(spec)  # a bad eta fails now, not after the first drawings
                grid.append(spec)
        else:
            grid.append(name)
    return grid


def guidance_name(guidance: Any) -> str:
    """The setting's label: the name, or ``interleaved(eta=E)`` for an interleaved mapping with an eta."""
    if isinstance(guidance, str):
        return guidance
    name = guidance.get("name", str(guidance))
    return f"{name}(eta={guidance['eta']:g})" if name == "interleaved" and "eta" in guidance else name


def draw_arguments(guidance: Any, references):
    """``(guidance, references)`` to draw a setting with: :data:`TEXT_ONLY` is plain CFG with no references."""
    return ("cfg", []) if guidance == TEXT_ONLY else (guidance, references)


def evaluate_generation(pipeline, items: Sequence[GenerationItem], encoder, *, guidances: Sequence = GUIDANCE_NAMES,
                        k: int | None = None, num_inference_steps: int | None = None, seed: int = 0, judge=None,
                        progress=None, **generate_kwargs) -> dict[str, Any]:
    """CLIP-T (cosine between the image and its prompt) and CLIP-I (mean cosine between the image
    and the entity's held-out images) for each guidance, per bucket, same seed and references; with
    ``judge`` (an :class:`~mmrag.pipelines.toyworld.judge.AttributeJudge`), also the share of
    drawings whose shape / colour / background / pattern it reads as the item's ``attributes``.

    ``encoder`` is a :class:`~mmrag.retrievers.DualEncoder` (the KB's, or a stronger CLIP).
    ``guidances`` are guidance names or mappings (:func:`guidance_grid`) and :data:`TEXT_ONLY`. ``k``
    and ``num_inference_steps`` left at ``None`` are the pipeline's configured values. ``mmrag eval
    generation --ray`` draws on a Ray actor pool instead
    (:func:`mmrag.pipelines.scale.batch_eval.evaluate_generation_batch`); the scores are the same.
    """
    names = [guidance_name(g) for g in guidances]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"`guidances` must name distinct settings, got {names!r}.")
    if judge is not None:
        check_judge_items(items, judge)
    drawings: list[tuple[GenerationItem, str, list]] = []
    for i, item in enumerate(items):
        refs = None  # retrieved once, reused for every guidance so that only the guidance differs
        for g in guidances:
            guidance, references = draw_arguments(g, refs)
            out = pipeline(item.prompt, k=k, references=references, guidance=guidance,
                           num_inference_steps=num_inference_steps, seed=seed, **generate_kwargs)
            if refs is None and references is None:
                refs = [h.record.open_image() for h in out.references]
            drawings.append((item, guidance_name(g), out.images))
        if progress is not None:
            progress(i + 1)
    return generation_summary(items, drawings, encoder, judge=judge)


def generation_summary(items: Sequence[GenerationItem], drawings: Sequence[tuple[GenerationItem, str, list]],
                       encoder, judge=None) -> dict[str, Any]:
    """Score ``(item, guidance name, images)`` drawings: CLIP-T and CLIP-I per guidance and bucket;
    with ``judge``, ``attribute_accuracy`` too: per slot of the items' ``attributes``, the mean over
    drawings of the share of a drawing's images the judge reads as that value."""
    import numpy as np
    from PIL import Image

    if judge is not None:
        check_judge_items(items, judge)
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}  # guidance -> bucket -> one row per drawing
    embedded: dict[int, tuple[Any, Any]] = {}  # per item: (held-out image vectors, prompt vector)
    for item, name, images in drawings:
        if id(item) not in embedded:
            embedded[id(item)] = (encoder.embed_images([Image.open(p).convert("RGB") for p in item.images]),
                                  encoder.embed_texts([item.prompt])[0])
        held_out, text = embedded[id(item)]
        vec = encoder.embed_images(list(images))
        row = {"clip_t": float(np.mean(vec @ text)), "clip_i": float(np.mean(vec @ held_out.T))}
        if judge is not None:
            agree = judge.scores(list(images), [item.attributes] * len(images))
            row.update({f"attr:{slot}": float(np.mean([a[slot] for a in agree])) for slot in item.attributes})
        rows.setdefault(name, {}).setdefault(item.bucket, []).append(row)

    def means(group: list[dict[str, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {m: float(np.mean([r[m] for r in group])) for m in ("clip_t", "clip_i")}
        slots = [k for k in dict.fromkeys(k for r in group for k in r) if k.startswith("attr:")]
        if slots:
            out["attribute_accuracy"] = {k[5:]: float(np.mean([r[k] for r in group if k in r])) for k in slots}
        return out

    summary: dict[str, Any] = {"n_prompts": len(items), "per_guidance": {}}
    for name, buckets in rows.items():
        summary["per_guidance"][name] = {
            **means([r for group in buckets.values() for r in group]),
            "per_bucket": {b: {**means(group), "n": len(group)} for b, group in sorted(buckets.items())},
        }
    if judge is not None:
        summary["judge"] = {"path": getattr(judge, "source", None), "measured": getattr(judge, "measured", None)}
    return summary


def generation_table(summary: dict[str, Any]) -> str:
    buckets = sorted({b for g in summary["per_guidance"].values() for b in g["per_bucket"]})
    head = ["guidance", "CLIP-T", "CLIP-I"] + [f"{b}: CLIP-T / CLIP-I" for b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, g in summary["per_guidance"].items():
        cells = [name, f"{g['clip_t']:.4f}", f"{g['clip_i']:.4f}"]
        cells += [f"{g['per_bucket'][b]['clip_t']:.4f} / {g['per_bucket'][b]['clip_i']:.4f}" if b in g["per_bucket"]
                  else "-" for b in buckets]
        lines.append("| " + " | ".join(cells) + " |")
    slots = list(dict.fromkeys(s for g in summary["per_guidance"].values() for s in g.get("attribute_accuracy", {})))
    if slots:
        judge = summary.get("judge") or {}
        clean = (judge.get("measured") or {}).get("clean")
        own = ("; its own held-out accuracy " + ", ".join(f"{s} {clean[s]:.3f}" for s in slots if s in clean)
               if clean else "")
        lines += ["", f"attribute accuracy (judge {judge.get('path')}{own})",
                  "| guidance | bucket | n | " + " | ".join(slots) + " |", "|---" * (len(slots) + 3) + "|"]
        for name, g in summary["per_guidance"].items():
            n = sum(v["n"] for v in g["per_bucket"].values())
            for bucket, values in [("all", {**g, "n": n}), *g["per_bucket"].items()]:
                acc = values.get("attribute_accuracy", {})
                lines.append(f"| {name} | {bucket} | {values['n']} | "
                             + " | ".join(f"{acc[s]:.3f}" if s in acc else "-" for s in slots) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- retrieve or generate
DECIDE_LABELS = ("retrieve", "generate")


@dataclass
class DecideItem:
    prompt: str
    label: str  # "retrieve": the KB holds an image that satisfies the prompt; "generate": it does not
    line: int


def load_decide_labels(path: str | Path) -> list[DecideItem]:
    """JSONL lines ``{"prompt": ..., "label": "retrieve" | "generate"}``; both labels must occur."""
    items = []
    for n, obj, where in _jsonl(path, "--labels"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ConfigError(f"{where}: needs a non-empty `prompt`.")
        if obj.get("label") not in DECIDE_LABELS:
            raise ConfigError(f"{where}: `label` must be one of {', '.join(map(repr, DECIDE_LABELS))}, "
                              f"got {obj.get('label')!r}.")
        items.append(DecideItem(obj["prompt"], obj["label"], n))
    missing = [label for label in DECIDE_LABELS if not any(i.label == label for i in items)]
    if missing:
        raise ConfigError(f"{path} has no {missing[0]!r} lines: a threshold is calibrated between the two labels, "
                          "so give prompts of both.")
    return items


def _decide_arrays(scores: Sequence[float], labels: Sequence[str]):
    import numpy as np

    if len(scores) != len(labels) or not len(scores):
        raise ConfigError(f"`scores` and `labels` must be non-empty and of one length, got {len(scores)} and {len(labels)}.")
    bad = [lab for lab in labels if lab not in DECIDE_LABELS]
    if bad:
        raise ConfigError(f"`labels` must be {' or '.join(map(repr, DECIDE_LABELS))}, got {bad[0]!r}.")
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ConfigError(f"`scores` must be finite numbers, got {s[~np.isfinite(s)][0]!r}.")
    return s, np.array([lab == "retrieve" for lab in labels])


def _rates(retrieved, should) -> tuple[float, float]:
    """(accuracy, balanced accuracy: the mean of each present label's recall) of boolean decisions."""
    correct = retrieved == should
    recalls = [float(correct[should == value].mean()) for value in (True, False) if (should == value).any()]
    return float(correct.mean()), sum(recalls) / len(recalls)


def decide_accuracy(scores: Sequence[float], labels: Sequence[str], threshold: float) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of the rule "retrieve when score >= threshold" on labelled prompts."""
    s, should = _decide_arrays(scores, labels)
    return _rates(s >= threshold, should)


def best_decide_threshold(scores: Sequence[float], labels: Sequence[str]) -> tuple[float, float]:
    """The threshold of "retrieve when score >= threshold" that maximises accuracy on labelled
    prompts, and that accuracy.

    Accuracy only changes at the scores, so the candidates are one per gap: the midpoint between
    each two adjacent distinct scores (a threshold away from both, not on a score), the lowest
    score (retrieve everything) and the float just above the highest (draw everything). Ties:
    the higher balanced accuracy, then the lower threshold. O(n log n).
    """
    import numpy as np

    s, should = _decide_arrays(scores, labels)
    values = np.unique(s)  # sorted, distinct
    lo, hi = values[:-1], values[1:]
    mid = (lo + hi) / 2
    mid = np.where(mid > lo, mid, hi)  # adjacent floats: the rounded midpoint must still lie above lo
    candidates = np.concatenate([values[:1], mid, [np.nextafter(values[-1], np.inf)]])
    pos, neg = np.sort(s[should]), np.sort(s[~should])
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")  # retrieve-labelled with score >= t
    tn = np.searchsorted(neg, candidates, side="left")  # generate-labelled with score < t
    recalls = [r for r, n in ((tp / max(len(pos), 1), len(pos)), (tn / max(len(neg), 1), len(neg))) if n]
    balanced = sum(recalls) / len(recalls)
    best = np.lexsort((candidates, -balanced, -(tp + tn)))[0]
    return float(candidates[best]), float((tp[best] + tn[best]) / len(s))


def evaluate_decide(pipeline, items: Sequence[DecideItem], *, k: int | None = None, threshold: float | None = None,
                    progress=None) -> dict[str, Any]:
    """Calibrate retrieve-or-generate: each prompt's best-reference score (``pipeline.best_reference``,
    what :class:`~mmrag.pipelines.draw.EntityImagePipeline` compares with ``decide_threshold``),
    the accuracy-maximising threshold (:func:`best_decide_threshold`), its accuracy and balanced
    accuracy, and with ``threshold`` the same at that threshold (one calibrated elsewhere)."""
    rows = []
    for i, item in enumerate(items):
        hit, score = pipeline.best_reference(item.prompt, k=k)
        if hit is None:
            raise ConfigError(f"line {item.line}: no reference with a stored image was retrieved for {item.prompt!r}; "
                              "a prompt needs one to be scored.")
        rows.append({"line": item.line, "prompt": item.prompt, "label": item.label, "score": score, "best": hit.id})
        if progress is not None:
            progress(i + 1)
    scores, labels = [r["score"] for r in rows], [r["label"] for r in rows]
    best, accuracy = best_decide_threshold(scores, labels)
    summary: dict[str, Any] = {
        "n": len(rows), "n_retrieve": labels.count("retrieve"), "n_generate": labels.count("generate"),
        "best": {"threshold": best, "accuracy": accuracy, "balanced_accuracy": decide_accuracy(scores, labels, best)[1]},
        "rows": rows,
    }
    if threshold is not None:
        acc, bal = decide_accuracy(scores, labels, threshold)
        summary["at_threshold"] = {"threshold": float(threshold), "accuracy": acc, "balanced_accuracy": bal}
    return summary


def decide_table(summary: dict[str, Any]) -> str:
    lines = [f"{summary['n']} prompts ({summary['n_retrieve']} retrieve, {summary['n_generate']} generate); "
             "rule: retrieve when the best reference's text -> image cosine >= threshold",
             "| threshold | accuracy | balanced accuracy |", "|---|---|---|"]
    for name in ("best", "at_threshold"):
        if name in summary:
            d = summary[name]
            label = " (best on this file)" if name == "best" else " (given)"
            lines.append(f"| {d['threshold']:.4f}{label} | {d['accuracy']:.3f} | {d['balanced_accuracy']:.3f} |")
    return "\n".join(lines)
