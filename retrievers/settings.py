"""What a retrieval call may be asked for: the channel, fusion and composed-method names and
:class:`RetrieverSettings`, validated. Light on purpose (no torch, no Chroma), so the command line
and the service schemas can name the choices without loading the retrieval stack."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .hubness import METHODS as HUBNESS_METHODS
from .hubness import SCOPES

# channel -> (needs text, needs image)
CHANNELS: dict[str, tuple[bool, bool]] = {
    "text_to_image": (True, False),
    "text_to_text": (True, False),
    "image_to_image": (False, True),
    "image_to_text": (False, True),
    "composed": (True, True),
    "lexical": (True, False),
    "late_interaction": (True, False),  # only on a KB with a late-interaction index
}
FUSIONS = ("rrf", "weighted")
COMPOSED_METHODS = ("weimocir", "pdv", "cirevl")
# Most hits one call returns. A reranker takes tens to hundreds and a result page fewer; a k
# beyond this is a bug, and each channel would fetch k candidates for it.
MAX_K = 10_000


@dataclass
class RetrieverSettings:
    """Everything ``retrieve(**overrides)`` may change for one call. Defaults follow the papers."""

    channels: tuple[str, ...] | None = None  # None: every channel the query's contents allow
    fusion: str = "rrf"
    rrf_k: int = 60
    weights: dict[str, float] = field(default_factory=dict)  # per channel, default 1.0
    n_candidates: int = 50  # per channel; raised to k when k is larger
    composed_method: str = "weimocir"
    weimocir_alpha: float = 0.8  # weight of the text in the fused query
    weimocir_beta: float = 0.1  # weight of the text-vector similarity in the score
    pdv_alpha_image: float = 1.0
    pdv_alpha_text: float = 1.0
    pdv_beta: float = 0.7
    pdv_compose: str = "{reference}, {modifier}"  # composed description when no rewriter is injected
    near_duplicate_threshold: float | None = 0.95  # cosine between image vectors; None: keep all
    mmr_lambda: float | None = None  # None: no diversity re-ordering
    hubness: str | None = None  # "qbnorm" (dynamic inverted softmax) | "dbnorm" (dual inverted softmax)
    # query-bank temperature; None: 20 for qbnorm (qb-norm's code), 1/1.99 for dbnorm (dbnorm.py beta1)
    hubness_beta: float | None = None
    hubness_gallery_beta: float | None = None  # dbnorm's gallery-bank temperature; None: 3 (dbnorm.py beta2)
    # gate by QB-Norm's activation set; None: on for qbnorm (the paper's DIS), off for dbnorm (DualIS, its default)
    hubness_dynamic: bool | None = None
    hubness_bank_size: int = 2048
    # hubness and WeiMoCIR: "gallery" scores every stored vector, "candidates" only each channel's
    # ANN candidates; "auto": gallery up to EXACT_GALLERY_MAX_RECORDS (100_000) records
    scoring_scope: str = "auto"
    rerank_candidates: int = 30  # fused hits handed to the reranker
    # late_interaction: FDE (ANN) candidates that exact Chamfer reranks (at least n); 300 reaches
    # recall@10 0.976-0.988 against brute-force Chamfer on 5,000 clustered documents (muvera.py's
    # table); 100k documents need ~1,000 (benchmarks/late_interaction.py)
    late_interaction_candidates: int = 300
    # interleaved documents: the best parts (passages or images) of each document hit, scored against
    # the query (passage-level rerank, passages.py) and given on Hit.parts; 0: none
    document_parts: int = 1

    def validate(self) -> RetrieverSettings:
        if self.channels is not None:
            chans = (self.channels,) if isinstance(self.channels, str) else tuple(self.channels)
            unknown = [c for c in chans if c not in CHANNELS]
            if unknown or not chans:
                raise ConfigError(f"`channels` {list(chans)!r} has unknown or no channels; choose from {list(CHANNELS)}.")
            self.channels = chans
        _choice("fusion", self.fusion, FUSIONS)
        _choice("composed_method", self.composed_method, COMPOSED_METHODS)
        if self.hubness is not None:
            _choice("hubness", self.hubness, HUBNESS_METHODS)
        _choice("scoring_scope", self.scoring_scope, SCOPES)
        for name in ("hubness_beta", "hubness_gallery_beta"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf")):
                raise ConfigError(f"`{name}` must be a positive number or None (the method's default), got {v!r}.")
        if not (self.hubness_dynamic is None or isinstance(self.hubness_dynamic, bool)):
            raise ConfigError(f"`hubness_dynamic` must be true, false or None (the method's default), "
                              f"got {self.hubness_dynamic!r}.")
        for name in ("rrf_k", "n_candidates", "rerank_candidates", "hubness_bank_size", "late_interaction_candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"`{name}` must be a positive integer, got {v!r}.")
        if not isinstance(self.document_parts, int) or isinstance(self.document_parts, bool) or self.document_parts < 0:
            raise ConfigError(f"`document_parts` must be an integer >= 0 (0: no parts on document hits), "
                              f"got {self.document_parts!r}.")
        for name in ("weimocir_alpha", "weimocir_beta", "pdv_beta"):
            _unit_interval(name, getattr(self, name))
        if self.near_duplicate_threshold is not None:
            _unit_interval("near_duplicate_threshold", self.near_duplicate_threshold, low=-1.0)
        if self.mmr_lambda is not None:
            _unit_interval("mmr_lambda", self.mmr_lambda)
        bad = {c: w for c, w in self.weights.items() if c not in CHANNELS or not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise ConfigError(f"`weights` {bad!r}: keys must be channels {list(CHANNELS)} and values numbers >= 0.")
        if "{modifier}" not in self.pdv_compose:
            raise ConfigError(f"`pdv_compose` must contain '{{modifier}}', got {self.pdv_compose!r}.")
        return self


def _choice(name: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"`{name}` must be one of {list(valid)}, got {value!r}.")


def _unit_interval(name: str, value: Any, low: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= 1:
        raise ConfigError(f"`{name}` must be a number in [{low:g}, 1], got {value!r}.")
