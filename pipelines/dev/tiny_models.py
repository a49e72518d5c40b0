"""Seeded, randomly initialised tiny models, written to disk and loaded back through `from_pretrained`.

Machines without the Hugging Face Hub (CI, the sandbox) run the whole library on these. Each model is
built from a config, with a tokenizer trained here on a small built-in corpus, and saved with
`save_pretrained` as safetensors, so that loading it exercises the same code path as a real Hub model.
Tiny models prove the plumbing, not answer quality.

Layout under ``directory`` (the IP-Adapter mirrors the h94/IP-Adapter repository)::

    clip/         CLIPModel + CLIPProcessor
    siglip/       SiglipModel + SiglipProcessor
    llava/        LlavaForConditionalGeneration + LlavaProcessor (chat template included)
    idefics3/     Idefics3ForConditionalGeneration + Idefics3Processor: a second VLM family, with its own
                  image tokens, pixel-shuffle connector and chat template
    sd/           StableDiffusionPipeline (32-px images)
    ip-adapter/models/ip-adapter_sd15.safetensors + ip-adapter/models/image_encoder/
    blip-itm/     BlipForImageTextRetrieval + BlipProcessor (image-text matching head, for reranking)
    colpali/      ColPaliForRetrieval + ColPaliProcessor (late interaction: one vector per token and patch)
"""

from __future__ import annotations

import collections
import inspect
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import filelock
import safetensors.torch
import sentencepiece
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection
from tokenizers import pre_tokenizers
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    ColPaliConfig,
    ColPaliForRetrieval,
    ColPaliProcessor,
    GemmaConfig,
    GemmaTokenizer,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
    SiglipVisionConfig,
)

from mmrag.retrievers.errors import ConfigError

TINY_MODEL_NAMES = ("clip", "siglip", "llava", "idefics3", "sd", "ip-adapter", "blip-itm", "colpali")
DUAL_ENCODER_FAMILIES = ("clip", "siglip")
DUAL_ENCODER_SIZES = ("tiny", "base")

# Written last into a finished model directory; a directory without it is a leftover of a killed build.
COMPLETE_MARKER = ".complete"

# Captions and questions in the style of the knowledge bases and prompts the tiny models serve. The
# pangrams put every letter in every vocabulary, so English text needs no unknown or byte tokens.
_CORPUS = (
    "A photo of a cat sitting on a red sofa.",
    "A black dog running across the green park.",
    "The Eiffel Tower in Paris at night, with lights.",
    "A painting of a small boat on a quiet lake.",
    "Two people riding bicycles along the beach at sunset.",
    "A bowl of fresh fruit on a wooden kitchen table.",
    "A red double-decker bus driving down a busy street in London.",
    "Snow-covered mountains under a clear blue sky.",
    "A close-up of a yellow flower with a bee.",
    "An old stone bridge over a river in the forest.",
    "What is shown in this image, and where was it taken?",
    "Describe the building in the picture in one sentence.",
    "Which animal appears in both of the reference images?",
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow: 0 1 2 3 4 5 6 7 8 9.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
)

# Shapes shared by both dual-encoder families. "tiny" follows the transformers/diffusers test models
# (hidden 32, 2 layers, 4 heads, 30-px images); "base" is the ViT-B/32 shape, for benchmarks.
_DUAL_ENCODER_SHAPES = {
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       image_size=30, patch_size=6),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32),
        "projection_dim": 32,
    },
    "base": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32),
        "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77),
        "projection_dim": 512,
    },
}
_TINY = _DUAL_ENCODER_SHAPES["tiny"]

# LLaVA-1.5's conversation format ("USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: ..."), but
# rendering each message's images and texts in the order given, so references can interleave with text.
_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif -%}"
    "{%- if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{%- else %}{% for item in message['content'] -%}"
    "{%- if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif -%}"
    "{%- endfor %}{% endif -%}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif -%}"
)

# Idefics3-8B-Llama3's conversation format ("User:<image>What is this?<end_of_utterance>\nAssistant: A
# cat.<end_of_utterance>\n"), with the tokenizer's BOS in place of Llama 3's literal "<|begin_of_text|>".
_IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _check_choice(argument: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"`{argument}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


# ----------------------------------------------------------------------------------------- tokenizers
def _learn_bpe(words: list[list[str]], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``words`` (each a list of initial symbols), most frequent pair first.

    Written out rather than taken from `tokenizers`' BpeTrainer, whose ties (frequent on a corpus this
    small) fall by hash order and so differ between runs; here they fall by the pair itself.
    """
    counts = collections.Counter(tuple(word) for word in words)
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        counts = collections.Counter({_merge(word, best): count for word, count in counts.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def clip_tokenizer(max_length: int, corpus: Sequence[str] | None = None) -> CLIPTokenizer:
    """Byte-level BPE with CLIP's normaliser, pre-tokenizer and "</w>" end-of-word suffix, its merges
    learnt from ``corpus`` (default: the tiny models' own sentences)."""
    backend = CLIPTokenizer().backend_tokenizer
    words = [
        list(word)
        for text in (_CORPUS if corpus is None else corpus)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ]
    merges = _learn_bpe([word[:-1] + [word[-1] + "</w>"] for word in words], num_merges=256)
    # CLIP's vocabulary order: every byte, every byte ending a word, the merges, then the two specials.
    # With all bytes listed any text encodes without the unknown token (which is also `<|endoftext|>`,
    # the position the text tower pools).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges=merges,
                         model_max_length=max_length)


def llama_tokenizer(words: Sequence[list[str]] | None = None, num_merges: int = 256) -> LlamaTokenizer:
    """Llama's BPE ("▁" marks a word start, unseen characters fall back to bytes) + LLaVA's `<image>`,
    its merges learnt from ``words`` (character lists; default: the tiny models' sentences)."""
    if words is None:
        words = [list("▁" + word) for text in _CORPUS for word in text.split()]
    merges = _learn_bpe(words, num_merges=num_merges)
    # Llama's vocabulary order: the three specials, the 256 byte-fallback tokens, characters, merges.
    characters = sorted({character for word in words for character in word})
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + characters
    vocab += [a + b for a, b in merges]
    tokenizer = LlamaTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges=merges,
                               add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


def gemma_tokenizer(corpus: Sequence[str] | None = None, num_merges: int = 256) -> GemmaTokenizer:
    """Gemma's BPE (spaces become "▁" and no prefix space is added, so only a word after a space starts
    with "▁"; unseen characters fall back to bytes), its merges learnt from ``corpus`` (default: the
    tiny models' sentences)."""
    words = [list(word if i == 0 else "▁" + word)
             for text in (_CORPUS if corpus is None else corpus) for i, word in enumerate(text.split())]
    merges = _learn_bpe(words, num_merges=num_merges)
    # Gemma's vocabulary order: pad, eos, bos, unk, mask, then (here) the 256 byte-fallback tokens,
    # characters and merges.
    characters = sorted({character for word in words for character in word})
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{byte:02X}>" for byte in range(256)] + characters
    vocab += [a + b for a, b in merges]
    # Right padding, as ColPali from v1.2 on ("right padding to fix unwanted tokens in the query encoding").
    return GemmaTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges=merges,
                          padding_side="right")


def _siglip_tokenizer(max_length: int, target: pathlib.Path) -> SiglipTokenizer:
    """A SentencePiece unigram model, as SigLIP's: lower-cased, `</s>` ends and pads every text.

    The model file is written straight into the model directory, where `save_pretrained` leaves it.
    """
    spiece = target / "spiece.model"
    with spiece.open("wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=(text.lower() for text in _CORPUS),  # the tokenizer lower-cases its input
            model_writer=model,
            model_type="unigram",
            vocab_size=256,
            hard_vocab_limit=False,  # the corpus is too small to fill a fixed vocabulary
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # SigLIP's ids
            pad_piece="<pad>",
            num_threads=1,  # one thread keeps the vocabulary reproducible
            minloglevel=2,
        )
    return SiglipTokenizer(vocab_file=str(spiece), model_max_length=max_length)


# ------------------------------------------------------------------------------------- dual encoders
def build_dual_encoder(
    directory: str | os.PathLike, *, family: str = "clip", size: str = "tiny", seed: int = 0
) -> pathlib.Path:
    """Write a random CLIP or SigLIP model + processor to ``directory/<family>`` ("-base" appended for "base")."""
    _check_choice("family", family, DUAL_ENCODER_FAMILIES)
    _check_choice("size", size, DUAL_ENCODER_SIZES)
    target = _new_model_dir(directory, family if size == "tiny" else f"{family}-{size}")
    shape = _DUAL_ENCODER_SHAPES[size]
    image_size = shape["vision"]["image_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "clip":
            max_length = shape["text"]["max_position_embeddings"]
            tokenizer = clip_tokenizer(max_length)
            text_config = dict(shape["text"], vocab_size=len(tokenizer), **_special_ids(tokenizer))
            model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=shape["vision"],
                                         projection_dim=shape["projection_dim"]))
            processor = CLIPProcessor(image_processor=_clip_image_processor(image_size), tokenizer=tokenizer)
        else:
            # SigLIP has no projection: the text head maps to the vision width so the two embeddings meet.
            # Its text tower pools the last position, hence fixed-length (padding="max_length") inputs,
            # 64 tokens long at base size as the released models.
            text_shape = shape["text"] | {"max_position_embeddings": 64 if size == "base" else 32}
            tokenizer = _siglip_tokenizer(text_shape["max_position_embeddings"], target)
            text_config = dict(text_shape, vocab_size=len(tokenizer), projection_size=shape["vision"]["hidden_size"],
                               **_special_ids(tokenizer))
            model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=shape["vision"]))
            image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
            processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        model.save_pretrained(target)
        processor.save_pretrained(target)
    return target


def _clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    # The PIL backend by name: transformers 5 maps `CLIPImageProcessor` to a torchvision backend and
    # only falls back to this one, with a warning, where torchvision is missing.
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _special_ids(tokenizer) -> dict[str, int | None]:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# --------------------------------------------------------------------------------------------- LLaVA
def _build_llava(target: pathlib.Path) -> None:
    tokenizer = llama_tokenizer()
    vision = _TINY["vision"]
    # Room for a few images (25 tokens each) and a conversation.
    text_config = LlamaConfig(**(_TINY["text"] | {"max_position_embeddings": 512}), vocab_size=len(tokenizer),
                              **_special_ids(tokenizer))
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(do_sample=False, **_special_ids(tokenizer))
    # As LLaVA-1.5: the vision tower's CLS token is counted (+1), then dropped by the "default" strategy,
    # so the processor expands each `<image>` to exactly the `patches` features the model inserts.
    processor = LlavaProcessor(image_processor=_clip_image_processor(vision["image_size"]), tokenizer=tokenizer,
                               patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(target)
    processor.save_pretrained(target)


# ------------------------------------------------------------------------------------------ Idefics3
def _build_idefics3(target: pathlib.Path) -> None:
    tokenizer = llama_tokenizer()
    # Idefics3's specials: each image reads <fake_token_around_image><global-img><image>...<image>
    # <fake_token_around_image>, and every turn ends with <end_of_utterance>.
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]})
    image_size, scale_factor = _TINY["vision"]["image_size"], 2
    # 3-px patches: a 10 x 10 grid, which the pixel shuffle (scale factor 2) folds into 25 image tokens.
    vision = Idefics3VisionConfig(**(_TINY["vision"] | {"patch_size": 3}))
    text_config = LlamaConfig(**(_TINY["text"] | {"max_position_embeddings": 512}), vocab_size=len(tokenizer),
                              **_special_ids(tokenizer))
    config = Idefics3Config(vision_config=vision, text_config=text_config, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    model = Idefics3ForConditionalGeneration(config)
    # A reply ends with <end_of_utterance>, so generation stops there as well as at </s>.
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config = GenerationConfig(
        do_sample=False, **(_special_ids(tokenizer) | {"eos_token_id": [tokenizer.eos_token_id, end_of_utterance]}))
    # No image splitting: at 30 px a split adds only tiles of the same size, so every image becomes one
    # 30 x 30 tile (real checkpoints split large images into 364-px tiles plus a global view).
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size})
    image_seq_len = (image_size // vision.patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=_IDEFICS3_CHAT_TEMPLATE)
    model.save_pretrained(target)
    processor.save_pretrained(target)


# ---------------------------------------------------------------------------------- Stable Diffusion
# Two resolution levels with cross-attention in the lower one: 16-px latents, 32-px images (the VAE
# halves once). The IP-Adapter builder derives its per-layer shapes from this same config.
_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)


def _build_sd(target: pathlib.Path) -> None:
    tokenizer = clip_tokenizer(_TINY["text"]["max_position_embeddings"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TINY["text"], vocab_size=len(tokenizer), **_special_ids(tokenizer)))
    unet = UNet2DConditionModel(**_UNET_CONFIG)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32)
    # SD 1.x's noise schedule; DDIM because it runs any number of steps, including the tests' two.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    # The feature extractor prepares IP-Adapter reference images for the tiny image encoder (30 px).
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=_clip_image_processor(_TINY["vision"]["image_size"]),
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(target, safe_serialization=True)


def _build_ip_adapter(target: pathlib.Path) -> None:
    models = target / "models"
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_TINY["vision"],
                                                                   projection_dim=_TINY["projection_dim"]))
    image_encoder.save_pretrained(models / "image_encoder")

    cross_attention_dim = _UNET_CONFIG["cross_attention_dim"]
    # The plain IP-Adapter: one image embedding -> 4 extra cross-attention tokens. diffusers renames
    # `image_proj.proj` to `image_embeds` on load; we store the original checkpoint's names.
    projection = ImageProjection(image_embed_dim=_TINY["projection_dim"], cross_attention_dim=cross_attention_dim,
                                 num_image_text_embeds=4)
    state = {
        "image_proj.proj.weight": projection.image_embeds.weight,
        "image_proj.proj.bias": projection.image_embeds.bias,
        "image_proj.norm.weight": projection.norm.weight,
        "image_proj.norm.bias": projection.norm.bias,
    }
    # The original code numbered every attention processor in `unet.attn_processors` order, self-
    # attention (attn1) even and cross-attention (attn2) odd; only the cross-attention ones carry
    # weights, so the keys run 1, 3, 5, ... (diffusers' `_convert_ip_adapter_attn_to_diffusers`).
    unet = UNet2DConditionModel(**_UNET_CONFIG)
    cross_attention_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross_attention_layers):
        hidden_size = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection_name in ("to_k_ip", "to_v_ip"):
            layer = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
            state[f"ip_adapter.{2 * index + 1}.{projection_name}.weight"] = layer.weight
    state = {key: tensor.detach().contiguous() for key, tensor in state.items()}
    safetensors.torch.save_file(state, models / "ip-adapter_sd15.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- BLIP (ITM)
def _bert_tokenizer() -> BertTokenizer:
    """BERT's uncased WordPiece, as BLIP's: the corpus words whole, plus every character as a word start
    and as a "##" continuation, so any ASCII text encodes without the unknown token."""
    words = sorted({word for text in _CORPUS for word in re.findall(r"\w+", text.lower())})
    characters = [chr(code) for code in range(33, 127) if not chr(code).isupper()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters] + words
    return BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))})


def _build_blip_itm(target: pathlib.Path) -> None:
    tokenizer = _bert_tokenizer()
    vision = _TINY["vision"]
    text_config = dict(_TINY["text"], vocab_size=len(tokenizer), projection_dim=_TINY["projection_dim"],
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id)
    # BlipVisionConfig initialises its weights with std 1e-10 (the released models overwrite them); at
    # that scale every image gives the same features, so the tiny model uses BERT's usual 0.02.
    vision_config = dict(vision, projection_dim=_TINY["projection_dim"], initializer_range=0.02)
    config = BlipConfig(text_config=text_config, vision_config=vision_config,
                        projection_dim=_TINY["projection_dim"], image_text_hidden_size=_TINY["projection_dim"])
    model = BlipForImageTextRetrieval(config)
    image_processor = BlipImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(target)
    processor.save_pretrained(target)


# ------------------------------------------------------------------------------------------ ColPali
def _build_colpali(target: pathlib.Path) -> None:
    # PaliGemma's layout: a SigLIP vision tower whose patches are projected to the width of a Gemma
    # decoder, which reads them after the prompt's `<image>` placeholders; ColPali projects each output
    # position to `embedding_dim` and L2-normalises it. The query and image prompts are in the corpus.
    defaults = inspect.signature(ColPaliProcessor.__init__).parameters
    prompts = (defaults["query_prefix"].default, defaults["visual_prompt_prefix"].default)  # "Question: ", ...
    tokenizer = gemma_tokenizer(_CORPUS + prompts)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = _TINY["vision"]
    image_seq_length = (vision["image_size"] // vision["patch_size"]) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]},
                                              image_seq_length=image_seq_length)
    # The processor adds PaliGemma's 1,152 <locXXXX>/<segXXX> tokens to the tokenizer: build it before
    # sizing the embedding table.
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # Width 64 (not 32), so that the projector (32 -> 64) and ColPali's head (64 -> 32) both change shape.
    # Gemma-2B's multi-query attention (one key/value head); positions are rotary, with room for long queries.
    text_config = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              vocab_size=len(tokenizer), **_special_ids(tokenizer))
    vlm_config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        hidden_size=text_config.hidden_size,
        projection_dim=text_config.hidden_size,
    )
    model = ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm_config, embedding_dim=_TINY["projection_dim"]))
    model.save_pretrained(target)
    processor.save_pretrained(target)


# ------------------------------------------------------------------------------------------- public
_BUILDERS: dict[str, Callable[[pathlib.Path], None]] = {
    "llava": _build_llava,
    "idefics3": _build_idefics3,
    "sd": _build_sd,
    "ip-adapter": _build_ip_adapter,
    "blip-itm": _build_blip_itm,
    "colpali": _build_colpali,
}


def build_tiny_model(name: str, directory: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny model ``name`` (one of `TINY_MODEL_NAMES`) to ``directory/<name>`` and return that path.

    The same ``seed`` gives byte-identical weight files. ``directory/<name>`` must not exist yet.
    """
    _check_choice("name", name, TINY_MODEL_NAMES)
    if name in DUAL_ENCODER_FAMILIES:
        return build_dual_encoder(directory, family=name, size="tiny", seed=seed)
    target = _new_model_dir(directory, name)
    with torch.random.fork_rng(devices=[]):  # seed the build without disturbing the caller's generator
        torch.manual_seed(seed)
        _BUILDERS[name](target)
    return target


def build_tiny_models(
    directory: str | os.PathLike,
    names: Iterable[str] | None = None,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, pathlib.Path]:
    """Build several tiny models (all of `TINY_MODEL_NAMES` by default); returns name -> directory."""
    names = TINY_MODEL_NAMES if names is None else tuple(names)
    for name in names:
        _check_choice("names", name, TINY_MODEL_NAMES)
    built = {}
    for name in names:
        if progress is not None:
            progress(f"building tiny model {name!r} in {directory}")
        built[name] = build_tiny_model(name, directory, seed=seed)
    return built


def ensure_tiny_model(name: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """Return ``cache_dir/<name>``, building it (seed 0) only if no complete build is there.

    Safe when several processes ask at once: one builds under a file lock, into a temporary directory
    that is renamed into place with its completion marker already written, so a killed build never
    leaves a directory that passes for a complete one.
    """
    _check_choice("name", name, TINY_MODEL_NAMES)
    cache_dir = pathlib.Path(cache_dir)
    target = cache_dir / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(cache_dir / f".{name}.lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process finished it while we waited
            return target
        # Holding the lock, any staging directory left here is a killed build's, never a live one.
        for stale in cache_dir.glob(f".{name}-building-*"):
            shutil.rmtree(stale)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{name}-building-") as staging:
            built = build_tiny_model(name, staging)
            (built / COMPLETE_MARKER).touch()
            if target.exists():  # a partial build from a killed process (no marker)
                shutil.rmtree(target)
            os.replace(built, target)
    return target


def _new_model_dir(directory: str | os.PathLike, name: str) -> pathlib.Path:
    target = pathlib.Path(directory) / name
    if target.exists():
        raise ConfigError(
            f"`directory` already holds {target}; delete it first, or call ensure_tiny_model() to reuse a build."
        )
    target.mkdir(parents=True)
    return target
