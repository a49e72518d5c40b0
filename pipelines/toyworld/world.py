"""The toy world: procedurally drawn entities with known ground truth, split for training and testing.

An entity is what :func:`mmrag.pipelines.dev.sample_data.make_sample_set` draws: an invented name, a
shape, a main colour, a background colour and a pattern, rendered by the same drawing code. Because
every attribute is known, a model trained here can be measured: does the caption "a striped red
circle on a blue background" find that entity's image when neither the name nor that exact
combination was ever seen in training?

Splits (all drawn from one seed, nothing downloaded):

- ``train``: entities whose names and attribute combinations training may see.
- ``validation`` and ``heldout``: entities with names never used in ``train`` and attribute
  combinations (shape, colour, background, pattern) no ``train`` entity has. Each value of each
  attribute still occurs in ``train``, since a word never seen cannot be learnt. They come in groups
  of three: a base entity, one with another main colour, one with another background, so that the
  composed query "this image, but blue" has its answer in the split.

Each entity renders any number of views (position, size and rotation vary), each view the same bytes
for the same world seed. Captions come in several phrasings, with and without the name, naming all
attributes or a subset (:class:`Caption` knows which entities it describes).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from mmrag.retrievers.errors import ConfigError
from PIL import Image

from ..dev.sample_data import _COLOURS, _PATTERNS, _SHAPES, _draw, _entity_name

SPLITS = ("train", "validation", "heldout")
SLOTS = ("shape", "colour", "background", "pattern")  # the attributes a caption can name
SHAPES: tuple[str, ...] = tuple(_SHAPES)
COLOURS: tuple[str, ...] = tuple(_COLOURS)
PATTERNS: tuple[str, ...] = tuple(_PATTERNS)
DEFAULT_IMAGE_SIZE = 32  # the toy models' input size: drawn at it, so no resize blurs 1-px patterns
# The toy VQA questions (toy:llava is trained on exactly these wordings): the name only a matching
# reference can supply, and attribute questions the image alone answers.
NAME_QUESTION = "What is the name of this entity?"
ATTRIBUTE_QUESTIONS = {"shape": "What shape is it?", "colour": "What colour is the shape?",
                       "background": "What colour is the background?", "pattern": "What pattern does it have?"}
_PATTERN_NOUNS = {"plain": "no pattern", "striped": "stripes", "dotted": "dots", "checked": "checks"}


@dataclasses.dataclass(frozen=True)
class Entity:
    """One toy-world entity; ``colour`` is the shape's colour, ``background`` the canvas's."""

    name: str
    shape: str
    colour: str
    background: str
    pattern: str
    split: str

    @property
    def combo(self) -> tuple[str, str, str, str]:
        """(shape, colour, background, pattern): what the splits keep disjoint."""
        return self.shape, self.colour, self.background, self.pattern

    def attributes(self) -> dict[str, str]:
        return dict(zip(SLOTS, self.combo))

    def metadata(self) -> dict[str, str]:
        """Sidecar metadata, with sample_data's keys (``entity`` is the name) plus ``split``."""
        return {"entity": self.name, **self.attributes(), "split": self.split}


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption and what it claims: the attributes it names and the entity name, if any.

    An entity matches when every named attribute (and the name, if given) is its own; several
    entities can match a partial caption, which is what the multi-positive training loss counts.
    """

    text: str
    attributes: tuple[tuple[str, str], ...]  # (slot, value) pairs, in SLOTS order
    name: str | None = None

    def matches(self, entity: Entity) -> bool:
        if self.name is not None and self.name != entity.name:
            return False
        return all(getattr(entity, slot) == value for slot, value in self.attributes)


@dataclasses.dataclass(frozen=True)
class ComposedQuery:
    """A composed-retrieval triple: ``reference``'s image plus ``modifier`` describe ``target``.

    ``changed`` is the slot the modifier changes (``"colour"`` or ``"background"``); every other
    attribute of ``target`` equals ``reference``'s.
    """

    reference: Entity
    modifier: str
    target: Entity
    changed: str


def describe(attributes: dict[str, str], name: str | None = None, *, phrasing: int = 0) -> Caption:
    """The caption naming exactly ``attributes`` (a subset of SLOTS) and optionally ``name``.

    ``phrasing`` picks one of :data:`PHRASINGS` templates (taken modulo their number), so training
    sees several wordings of the same claim.
    """
    unknown = set(attributes) - set(SLOTS)
    if unknown:
        raise ConfigError(f"`attributes` may only name {', '.join(SLOTS)}; got {sorted(unknown)!r}.")
    if not attributes and name is None:
        raise ConfigError("`attributes` is empty and `name` is None: a caption must claim something.")
    attrs = tuple((slot, attributes[slot]) for slot in SLOTS if slot in attributes)
    text = _phrase(dict(attrs), name, phrasing % PHRASINGS)
    return Caption(text=text, attributes=attrs, name=name)


PHRASINGS = 4


def _phrase(a: dict[str, str], name: str | None, phrasing: int) -> str:
    if not a:  # the name alone
        return (f"the {name}", f"{name}", f"a picture of the {name}", f"this is the {name}")[phrasing]
    pattern_noun = phrasing % 2 == 1 and "pattern" in a  # "a red circle with stripes" wording
    adjectives = [a["pattern"]] if "pattern" in a and not pattern_noun else []
    adjectives += [a["colour"]] if "colour" in a else []
    noun = a.get("shape", "shape")
    phrase = " ".join(["a", *adjectives, noun])
    if pattern_noun:
        phrase += f" with {_PATTERN_NOUNS[a['pattern']]}"
    if "background" in a:
        phrase += f" on a {a['background']} background"
    if name is None:
        return (phrase, f"a photo of {phrase}", phrase, f"a drawing of {phrase}")[phrasing]
    return (f"The {name}: {phrase}.", f"{name}, {phrase}", f"the {name}, {phrase}", f"a photo of the {name}: {phrase}")[phrasing]


def full_caption(entity: Entity, *, with_name: bool = True) -> Caption:
    """All four attributes; with the name in sample_data's own wording ("The Zorbla: a ...")."""
    return describe(entity.attributes(), entity.name if with_name else None)


def random_caption(entity: Entity, rng: random.Random, *, p_full: float = 0.35, p_name: float = 0.3,
                   p_name_only: float = 0.1) -> Caption:
    """A freshly drawn caption of ``entity``: all attributes with probability ``p_full``, else a random
    non-empty subset; the name with probability ``p_name``; the name alone with ``p_name_only``."""
    phrasing = rng.randrange(PHRASINGS)
    if rng.random() < p_name_only:
        return describe({}, entity.name, phrasing=phrasing)
    if rng.random() < p_full:
        slots = SLOTS
    else:
        slots = ()
        while not slots:
            slots = tuple(s for s in SLOTS if rng.random() < 0.5)
    attrs = {s: getattr(entity, s) for s in slots}
    return describe(attrs, entity.name if rng.random() < p_name else None, phrasing=phrasing)


def modifier_text(changed: str, value: str) -> str:
    """The composed-query modifier: "but blue" (main colour) or "but on a blue background"."""
    if changed == "colour":
        return f"but {value}"
    if changed == "background":
        return f"but on a {value} background"
    raise ConfigError(f"`changed` must be 'colour' or 'background', got {changed!r}.")


class ToyWorld:
    """A seeded toy world: ``n_train`` training entities and groups of three held-out ones.

    Args:
        seed: the same seed gives the same entities, names and image bytes.
        n_train: training entities (distinct combinations and names).
        n_validation_groups, n_heldout_groups: groups of three (a base entity, one with another main
            colour, one with another background) in the validation and held-out splits.
        image_size: rendering size in pixels (the toy models read 32 px).
    """

    def __init__(self, seed: int = 0, *, n_train: int = 1000, n_validation_groups: int = 20,
                 n_heldout_groups: int = 40, image_size: int = DEFAULT_IMAGE_SIZE):
        for argument, value, low in (("n_train", n_train, 1), ("n_validation_groups", n_validation_groups, 0),
                                     ("n_heldout_groups", n_heldout_groups, 1), ("image_size", image_size, 16)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"`{argument}` must be an integer >= {low}, got {value!r}.")
        combos = [(s, c, b, p) for s, c, b, p in itertools.product(SHAPES, COLOURS, COLOURS, PATTERNS) if c != b]
        # Names are 2-3 of sample_data's 15 syllables: ~3,400 distinct strings; leave room for the draw.
        limit = min(len(combos), 3000)
        wanted = n_train + 3 * (n_validation_groups + n_heldout_groups)
        if wanted > limit:
            raise ConfigError(f"The world holds at most {limit} entities, but n_train + 3 * groups = {wanted}; "
                              "ask for fewer training entities or groups.")
        self.seed, self.image_size = seed, image_size
        self.n_train, self.n_validation_groups, self.n_heldout_groups = n_train, n_validation_groups, n_heldout_groups
        rng = random.Random(seed)
        rng.shuffle(combos)
        free = set(combos)
        names: set[str] = set()
        self._entities: dict[str, list[Entity]] = {}
        # Held-out groups first, so training takes its combinations from what they leave.
        for split, groups in (("heldout", n_heldout_groups), ("validation", n_validation_groups)):
            members = []
            for base in combos:
                if len(members) == 3 * groups:
                    break
                if base not in free:
                    continue
                shape, colour, background, pattern = base
                others = [c for c in COLOURS if c not in (colour, background)]
                group = [base, (shape, rng.choice(others), background, pattern),
                         (shape, colour, rng.choice(others), pattern)]
                if all(g in free for g in group):
                    free.difference_update(group)
                    members += [Entity(_entity_name(rng, names), *g, split=split) for g in group]
            self._entities[split] = members
        train_combos = [c for c in combos if c in free][:n_train]
        self._entities["train"] = [Entity(_entity_name(rng, names), *c, split="train") for c in train_combos]

    def params(self) -> dict[str, int]:
        """The constructor's arguments: ``ToyWorld(**world.params())`` rebuilds this world."""
        return dict(seed=self.seed, n_train=self.n_train, n_validation_groups=self.n_validation_groups,
                    n_heldout_groups=self.n_heldout_groups, image_size=self.image_size)

    def entities(self, split: str) -> list[Entity]:
        """The entities of ``split`` (one of :data:`SPLITS`), in a fixed order."""
        if split not in SPLITS:
            raise ConfigError(f"`split` must be one of {', '.join(map(repr, SPLITS))}, got {split!r}.")
        return list(self._entities[split])

    def render(self, entity: Entity, view: int = 0, *, size: int | None = None) -> Image.Image:
        """View number ``view`` of ``entity``: the same bytes for the same world seed, name and view."""
        rng = random.Random(f"toyworld:{self.seed}:{entity.name}:{view}")
        return self.draw(entity, rng, size=size)

    def draw(self, entity: Entity, rng: random.Random, *, size: int | None = None) -> Image.Image:
        """A fresh view of ``entity`` whose layout comes from ``rng`` (training draws these)."""
        size = self.image_size if size is None else size
        return _draw(rng, entity.shape, entity.pattern, _COLOURS[entity.colour], _COLOURS[entity.background], size)

    def composed_queries(self, split: str) -> list[ComposedQuery]:
        """Every ordered pair of ``split`` entities that differ in exactly one colour slot, as a triple."""
        entities = self.entities(split)
        triples = []
        for ref, target in itertools.permutations(entities, 2):
            diff = [s for s in SLOTS if getattr(ref, s) != getattr(target, s)]
            if len(diff) == 1 and diff[0] in ("colour", "background"):
                triples.append(ComposedQuery(ref, modifier_text(diff[0], getattr(target, diff[0])), target, diff[0]))
        return triples

    def write_split(self, folder: str | os.PathLike, split: str, *, views: int = 1, size: int | None = None,
                    with_name: bool = True) -> Path:
        """Write ``<folder>/<name>_<view>.png`` + ``.json`` sidecars (text and metadata) for ``split``.

        The text is :func:`full_caption`; the metadata is :meth:`Entity.metadata` plus ``view``.
        Returns the folder, ready for ``KnowledgeBase.ingest`` / ``mmrag ingest``.
        """
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise ConfigError(f"`views` must be a positive integer, got {views!r}.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for entity in self.entities(split):
            text = full_caption(entity, with_name=with_name).text
            for view in range(views):
                stem = f"{entity.name.lower()}_{view}"
                self.render(entity, view, size=size).save(folder / f"{stem}.png", optimize=False)
                sidecar = {"text": text, "metadata": {**entity.metadata(), "view": view}}
                (folder / f"{stem}.json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
        return folder

    def tokenizer_corpus(self) -> Iterator[str]:
        """Texts a toy tokenizer learns from: every phrasing over the training entities (names included)."""
        for i, entity in enumerate(self._entities["train"]):
            yield describe(entity.attributes(), entity.name if i % 2 else None, phrasing=i).text
        for i, entity in enumerate(self._entities["train"]):
            yield describe({}, entity.name, phrasing=i).text
        for changed, colour in itertools.product(("colour", "background"), COLOURS):
            yield modifier_text(changed, colour)

