"""Creating and reading a knowledge base's manifest (``mmrag-kb.json``).

The manifest stamps the schema version, the library version, the embedder id and dimension, the
backend (embedded Chroma or a server) and the collection names. It is written last when a KB is
created, under the writer lock (two creators take turns), so a folder without it is either not a
KB or a creation that was killed (which the next open redoes).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrag import __version__

from ..errors import ConfigError, EmbedderMismatchError, NotAKnowledgeBaseError, SchemaVersionError

if TYPE_CHECKING:  # the encoder modules import torch; reading a manifest must not
    from ..encoders import DualEncoder
    from ..multivector import MultiVectorEncoder

MANIFEST_NAME = "mmrag-kb.json"
SCHEMA_VERSION = 1
LOCK_NAME = ".write.lock"
HOLDER_NAME = "writer.json"
# write_json_atomic's temporary names for the two files a creation writes
_CREATION_TMP = re.compile(r"\.(%s|%s)\.\d+\.tmp" % (re.escape(MANIFEST_NAME), re.escape(HOLDER_NAME)))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_unfinished_creation(path: Path) -> bool:
    """An empty folder, or what a creation killed before its manifest's rename leaves: Chroma's
    data, the writer lock and its holder note, and the temporary files of the manifest and the
    note (``.mmrag-kb.json.<pid>.tmp``). Nothing else: redoing a creation drops the collections
    under ``chroma/``, so a folder with anything more (images, a journal) is not taken for one."""
    return all(p.name in {"chroma", LOCK_NAME, HOLDER_NAME} or _CREATION_TMP.fullmatch(p.name) for p in path.iterdir())


def new_manifest(embedder: DualEncoder, url: str | None, late_interaction: MultiVectorEncoder | None = None,
                 fde: dict | None = None) -> dict:
    """A new KB's manifest; with ``late_interaction`` (a multi-vector encoder) and ``fde`` (an
    ``FDEConfig.to_dict()``), it also names the late-interaction index."""
    from ..encoders import normalize_model_id  # an embedder exists, so torch is loaded already

    kb_id = uuid.uuid4().hex
    # In server mode many KBs share one Chroma; unique collection names keep them apart.
    prefix = "mmrag" if url is None else f"mmrag-{kb_id[:12]}"
    manifest = {
        "format": "mmrag-knowledge-base",
        "schema_version": SCHEMA_VERSION,
        "library_version": __version__,
        "kb_id": kb_id,
        "created_at": now(),
        "embedder": {"model_id": normalize_model_id(embedder.model_id), "dim": embedder.dim},
        "backend": "embedded" if url is None else "server",
        "url": url,
        "collections": {"images": f"{prefix}-images", "texts": f"{prefix}-texts"},
    }
    if late_interaction is not None:
        manifest["late_interaction"] = {"model_id": normalize_model_id(late_interaction.model_id),
                                        "dim": late_interaction.dim, "fde": fde, "collection": f"{prefix}-fde"}
    return manifest


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NotAKnowledgeBaseError(f"Cannot read the knowledge-base manifest {str(path)!r}: {e}.") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"The knowledge base {str(path.parent)!r} has schema version {version!r}; this mmrag "
            f"({__version__}) reads version {SCHEMA_VERSION}. Re-ingest with this version or use a matching mmrag."
        )
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def check_creatable(path: Path, embedder: DualEncoder | None, create: bool) -> bool:
    """Whether ``path`` (which had no manifest) is a KB to create: raises for a folder that is not
    a KB, for ``create=False`` and for a creation without an embedder; False when another process
    finished creating it meanwhile (its manifest is there now)."""
    manifest_path = path / MANIFEST_NAME
    if path.is_file() or (path.is_dir() and not is_unfinished_creation(path)):
        if manifest_path.exists():  # a creator finished (and its writes began) since we looked
            return False
        raise NotAKnowledgeBaseError(
            f"{str(path)!r} is not an mmrag knowledge base (no {MANIFEST_NAME}). "
            "Pass the folder you ingested into, or an empty/new folder to create one."
        )
    if not create:
        raise NotAKnowledgeBaseError(
            f"No knowledge base at {str(path)!r}. Create one with `mmrag ingest SOURCE --kb {path}`."
        )
    if embedder is None:
        raise ConfigError("`embedder` is required to create a knowledge base: pass a DualEncoder or a model id.")
    return True


def check_manifest(manifest: dict, path: Path, embedder: DualEncoder | None, url: str | None,
                   late_interaction: MultiVectorEncoder | None = None) -> None:
    """Refuse a ``url`` for an embedded KB, and another embedder (or multi-vector encoder) than the KB's."""
    if url is not None and manifest["backend"] == "embedded":
        raise ConfigError(
            f"`url` is {url!r} but the knowledge base at {str(path)!r} keeps its vectors in embedded Chroma; "
            "drop `url` (or build a new KB against the server)."
        )
    li = manifest.get("late_interaction")
    if late_interaction is not None and (li is None or late_interaction.model_id != li["model_id"]):
        raise EmbedderMismatchError(
            f"The knowledge base at {str(path)!r} has " + (f"its late-interaction index built with {li['model_id']!r}"
                                                           if li else "no late-interaction index")
            + f", not {late_interaction.model_id!r}. Open it without `late_interaction` to use "
            + ("its own" if li else "it as it is") + ", or ingest into a new KB created with it.")
    if embedder is not None and embedder.model_id != manifest["embedder"]["model_id"]:
        raise EmbedderMismatchError(
            f"The knowledge base at {str(path)!r} was built with the embedder {manifest['embedder']['model_id']!r} "
            f"(dim {manifest['embedder']['dim']}), not {embedder.model_id!r}. Open it without an embedder to use "
            "its own, or ingest into a new KB."
        )
