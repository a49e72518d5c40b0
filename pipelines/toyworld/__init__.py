"""The toy world: entities with known ground truth, and tiny models trained on them (``toy:clip``).

Random tiny models (``tiny:``) prove the plumbing; toy models are trained, so the library's retrieval
and generation can be measured offline. They claim nothing about real-model quality.
"""

from .world import (
    COLOURS,
    PATTERNS,
    SHAPES,
    SLOTS,
    SPLITS,
    Caption,
    ComposedQuery,
    Entity,
    ToyWorld,
    describe,
    full_caption,
    modifier_text,
    random_caption,
)

__all__ = [
    "COLOURS", "PATTERNS", "SHAPES", "SLOTS", "SPLITS", "Caption", "ComposedQuery", "Entity", "ToyWorld",
    "describe", "full_caption", "modifier_text", "random_caption",
]
