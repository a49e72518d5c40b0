"""Guidance objects: which denoiser rows a step needs, and how to combine their predictions.

Notation: c_t is the text condition, c_r the reference condition (the
IP-Adapter image embeddings of the retrieved references), eps(x, ., .) the denoiser's prediction, and
"0" a dropped condition: the negative/empty prompt for text, zero image embeddings for references
(what the IP-Adapter's unconditional branch uses, and how its checkpoints were trained to drop).

A denoising loop drives a guidance object through two calls per step ``i`` of ``n``::

    rows = guidance.rows(i, n)                         # e.g. ("cond", "drop_text")
    predictions = {row: eps for row, eps in zip(rows, unet(batch of those rows).chunk(len(rows)))}
    eps = guidance.forward(i, n, predictions)          # the guided prediction, (B, C, h, w)

so the loop batches exactly the rows asked for into one denoiser call. Each row names a condition:

    "cond"            eps(x, c_t, c_r)
    "drop_text"       eps(x, 0,   c_r)
    "drop_reference"  eps(x, c_t, 0)
    "drop_both"       eps(x, 0,   0)

The guided predictions (w_t, w_r the text and reference scales):

    cfg          eps = eps(x,0,0) + w_t * (eps(x,c_t,c_r) - eps(x,0,0))         text and references dropped together
    text-enh.    eps_t = w_t * eps(x,c_t,c_r) - (w_t - 1) * eps(x,0,c_r)
    ref.-enh.    eps_r = w_r * eps(x,c_t,c_r) - (w_r - 1) * eps(x,c_t,0)
    interleaved  each step one of eps_t, eps_r (Re-Imagen); a share eta of the steps, spread evenly and
                 deterministically over the schedule, use eps_t; two rows per image per step
    joint        eps(x,c_t,c_r) + (w_t-1)(eps(x,c_t,c_r) - eps(x,0,c_r)) + (w_r-1)(eps(x,c_t,c_r) - eps(x,c_t,0));
                 three rows per image per step

Guidance objects are frozen dataclasses: ``to_dict()`` gives ``{"name": ..., **parameters}`` and
`guidance_from_config` (or ``Guidance.from_dict``) rebuilds one from a name or such a dict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch

from mmrag.generators.errors import GuidanceError

Row = Literal["cond", "drop_text", "drop_reference", "drop_both"]
ROWS: tuple[Row, ...] = ("cond", "drop_text", "drop_reference", "drop_both")

# Starting points, not tuned values (random-weight models cannot tune them). The text scale is SD
# 1.x's usual CFG scale. The reference scale sits at the low end of the SD-scale range the anchors
# give (3-8): the IP-Adapter scale already sets how strongly the references enter eps(c_t, c_r), and
# w_r extrapolates further away from eps(c_t, 0) on top of it. An even split of the steps between
# the two directions (eta in {0.25, 0.5, 0.75} to explore). These are the only defaults: the
# pipelines' config (draw.guidance) takes them from here.
DEFAULT_SCALE = 7.5
DEFAULT_REFERENCE_SCALE = 3.0
DEFAULT_ETA = 0.5


class Guidance:
    """Base class: one guided prediction per step from the rows that step asks for."""

    name: ClassVar[str]

    def rows(self, step: int, num_steps: int) -> tuple[Row, ...]:
        """The conditions to evaluate at step ``step`` (0-based) of ``num_steps``, in batch order."""
        raise NotImplementedError

    def forward(self, step: int, num_steps: int, predictions: Mapping[Row, torch.Tensor]) -> torch.Tensor:
        """The guided prediction from ``predictions`` (one tensor per row of ``rows(step, num_steps)``)."""
        raise NotImplementedError

    @property
    def text_scale(self) -> float:
        raise NotImplementedError

    def without_references(self) -> ClassifierFreeGuidance:
        """The guidance to use when there are no references: plain CFG at this guidance's text scale."""
        return ClassifierFreeGuidance(scale=self.text_scale)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Guidance:
        guidance = guidance_from_config(data)
        if not isinstance(guidance, cls):
            raise GuidanceError(f"`data` describes {guidance.name!r} guidance, not {cls.name!r}: {dict(data)!r}.")
        return guidance

    def _check(self, step: int, num_steps: int, predictions: Mapping[Row, torch.Tensor] | None = None) -> None:
        if not 0 <= step < num_steps:
            raise GuidanceError(f"`step` must be in [0, num_steps={num_steps}), got {step!r}.")
        if predictions is not None:
            missing = [row for row in self.rows(step, num_steps) if row not in predictions]
            if missing:
                raise GuidanceError(f"`predictions` lacks the rows {missing} that step {step} asked for; "
                                    f"evaluate every row of `rows({step}, {num_steps})`.")


@dataclasses.dataclass(frozen=True)
class ClassifierFreeGuidance(Guidance):
    """Plain CFG, what an IP-Adapter pipeline does by default: text and references dropped together.

    eps = eps(x,0,0) + s * (eps(x,c_t,c_r) - eps(x,0,0)); two rows per image.
    """

    name: ClassVar[str] = "cfg"
    scale: float = DEFAULT_SCALE

    def __post_init__(self):
        object.__setattr__(self, "scale", _check_scale("scale", self.scale))

    @property
    def text_scale(self) -> float:
        return self.scale

    def rows(self, step: int, num_steps: int) -> tuple[Row, ...]:
        self._check(step, num_steps)
        # diffusers' batch order ([uncond, cond]), so that this loop reproduces its pipelines exactly.
        return ("drop_both", "cond")

    def forward(self, step: int, num_steps: int, predictions: Mapping[Row, torch.Tensor]) -> torch.Tensor:
        self._check(step, num_steps, predictions)
        uncond, cond = predictions["drop_both"], predictions["cond"]
        return uncond + self.scale * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class JointGuidance(Guidance):
    """Both directions every step (the 3-row baseline that interleaving is measured against):

    eps = eps_c + (w_t - 1)(eps_c - eps(x,0,c_r)) + (w_r - 1)(eps_c - eps(x,c_t,0)).
    """

    name: ClassVar[str] = "joint"
    text_scale: float = DEFAULT_SCALE
    reference_scale: float = DEFAULT_REFERENCE_SCALE

    def __post_init__(self):
        object.__setattr__(self, "text_scale", _check_scale("text_scale", self.text_scale))
        object.__setattr__(self, "reference_scale", _check_scale("reference_scale", self.reference_scale))

    def rows(self, step: int, num_steps: int) -> tuple[Row, ...]:
        self._check(step, num_steps)
        return ("cond", "drop_text", "drop_reference")

    def forward(self, step: int, num_steps: int, predictions: Mapping[Row, torch.Tensor]) -> torch.Tensor:
        self._check(step, num_steps, predictions)
        cond = predictions["cond"]
        return (cond + (self.text_scale - 1) * (cond - predictions["drop_text"])
                + (self.reference_scale - 1) * (cond - predictions["drop_reference"]))


@dataclasses.dataclass(frozen=True)
class InterleavedGuidance(Guidance):
    """Re-Imagen's interleaved guidance: each step uses exactly one of

        text-enhanced       eps_t = w_t * eps(x,c_t,c_r) - (w_t - 1) * eps(x,0,c_r)
        reference-enhanced  eps_r = w_r * eps(x,c_t,c_r) - (w_r - 1) * eps(x,c_t,0)

    with a fraction ``eta`` of the steps text-enhanced. Two rows per image per step, as plain CFG.
    """

    name: ClassVar[str] = "interleaved"
    text_scale: float = DEFAULT_SCALE
    reference_scale: float = DEFAULT_REFERENCE_SCALE
    eta: float = DEFAULT_ETA

    def __post_init__(self):
        object.__setattr__(self, "text_scale", _check_scale("text_scale", self.text_scale))
        object.__setattr__(self, "reference_scale", _check_scale("reference_scale", self.reference_scale))
        eta = _check_number("eta", self.eta)
        if not 0.0 <= eta <= 1.0:
            raise GuidanceError(f"`eta` (the share of text-enhanced steps) must be in [0, 1], got {self.eta!r}; "
                                "0 makes every step reference-enhanced, 1 every step text-enhanced.")
        object.__setattr__(self, "eta", eta)

    def is_text_step(self, step: int) -> bool:
        # Deterministic, evenly spread (Bresenham-style): step i is a text step when floor((i+1)*eta)
        # reaches a new integer, so any n steps hold floor(n*eta) text steps, none of them random.
        return math.floor((step + 1) * self.eta) - math.floor(step * self.eta) == 1

    def rows(self, step: int, num_steps: int) -> tuple[Row, ...]:
        self._check(step, num_steps)
        return ("cond", "drop_text") if self.is_text_step(step) else ("cond", "drop_reference")

    def forward(self, step: int, num_steps: int, predictions: Mapping[Row, torch.Tensor]) -> torch.Tensor:
        self._check(step, num_steps, predictions)
        if self.is_text_step(step):
            scale, dropped = self.text_scale, predictions["drop_text"]
        else:
            scale, dropped = self.reference_scale, predictions["drop_reference"]
        return scale * predictions["cond"] - (scale - 1) * dropped


GUIDANCES: dict[str, type[Guidance]] = {
    cls.name: cls for cls in (ClassifierFreeGuidance, JointGuidance, InterleavedGuidance)
}


def guidance_from_config(config: str | Mapping[str, Any] | Guidance, **overrides: Any) -> Guidance:
    """A guidance object from a name (``"cfg"``, ``"joint"``, ``"interleaved"``), a ``to_dict()``-style
    mapping with a ``"name"`` key, or an existing object; keyword ``overrides`` replace parameters.

    >>> guidance_from_config("interleaved", eta=0.25)
    InterleavedGuidance(text_scale=7.5, reference_scale=7.5, eta=0.25)
    """
    if isinstance(config, Guidance):
        name, params = config.name, dataclasses.asdict(config)
    elif isinstance(config, str):
        name, params = config, {}
    elif isinstance(config, Mapping):
        params = dict(config)
        if "name" not in params:
            raise GuidanceError(f"`config` needs a 'name' key (one of {sorted(GUIDANCES)}), got {dict(config)!r}.")
        name = params.pop("name")
    else:
        raise GuidanceError(f"`guidance` must be a name, a mapping with a 'name' key or a Guidance object, "
                            f"got {type(config).__name__} {config!r}.")
    if name not in GUIDANCES:
        raise GuidanceError(f"Unknown guidance {name!r}; choose one of {', '.join(map(repr, GUIDANCES))}.")
    cls = GUIDANCES[name]
    params.update(overrides)
    valid = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise GuidanceError(f"{name!r} guidance has no parameter {', '.join(map(repr, unknown))}; "
                            f"its parameters are {', '.join(map(repr, valid))}.")
    return cls(**params)


def _check_number(argument: str, value: Any) -> float:
    # bool is an int subclass, and True as a scale is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GuidanceError(f"`{argument}` must be a finite number, got {value!r}.")
    return float(value)


def _check_scale(argument: str, value: Any) -> float:
    scale = _check_number(argument, value)
    if scale < 0:
        raise GuidanceError(f"`{argument}` must be >= 0 (1 means no guidance, 0 the dropped prediction alone), "
                            f"got {value!r}.")
    return scale
