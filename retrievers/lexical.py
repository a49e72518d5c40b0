"""BM25 over record texts (bm25s), persisted beside the knowledge base.

Dual encoders blur rare names ("Chortai", "Picarones") into their neighbours; exact word match
catches them. The index is derived data: it records the KB revision it was built at and is
rebuilt from the KB's texts on the first search after any add or delete, so it can never serve
a deleted record or miss a new one, even after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kb import KnowledgeBase

_DIR = "lexical"


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class LexicalIndex:
    """``search(text, n, where)`` -> ``[(id, bm25 score)]``, best first, scores > 0 only."""

    def __init__(self, kb: "KnowledgeBase"):
        self.kb = kb
        self.dir = kb.path / _DIR
        self._bm25 = None
        self._ids: list[str] = []
        self._revision: str | None = None
        self._lock = threading.Lock()

    def search(self, text: str, n: int, where: dict | None = None) -> list[tuple[str, float]]:
        bm25, ids = self._snapshot()  # one consistent (index, ids) pair, whatever other threads do
        if not ids:
            return []
        vocab = bm25.vocab_dict
        tokens = [t for t in _tokenize([text])[0] if t in vocab]
        if not tokens:
            return []
        # over-fetch when filtering: the filter is applied after scoring
        fetch = min(len(ids), n if where is None else max(n * 10, 100))
        docs, scores = bm25.retrieve([tokens], k=fetch, show_progress=False)
        hits = [(ids[d], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
        if where is not None and hits:
            allowed = set(self.kb.vectors.ids_where("texts", where, ids=[i for i, _ in hits]))
            hits = [h for h in hits if h[0] in allowed]
        return hits[:n]

    def _snapshot(self):
        revision = self.kb.revision
        with self._lock:
            if self._revision != revision and not self._load(revision):
                self._build(revision)
            return self._bm25, self._ids

    def _load(self, revision: str) -> bool:
        import bm25s

        meta_path = self.dir / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        if meta.get("revision") != revision:
            return False
        ids = meta["ids"]
        try:
            bm25 = bm25s.BM25.load(str(self.dir / "bm25"), allow_pickle=False, show_progress=False) if ids else None
        except OSError:  # another process swapped the folder while this one read it: build our own
            return False
        self._bm25, self._ids, self._revision = bm25, ids, revision
        return True

    def _build(self, revision: str) -> None:
        import bm25s

        ids, texts = [], []
        offset, page = 0, 10_000
        while True:
            res = self.kb.vectors.texts.get(include=["documents"], limit=page, offset=offset)
            ids.extend(res["ids"])
            texts.extend(res["documents"])
            if len(res["ids"]) < page:
                break
            offset += page
        bm25 = None
        tmp = self.dir.with_name(f".{_DIR}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        if ids:
            bm25 = bm25s.BM25()
            bm25.index(_tokenize(texts), show_progress=False)
            bm25.save(str(tmp / "bm25"))
        if self.kb.revision != revision:
            # a writer changed records while we read them: use this index for the search at hand,
            # but neither keep nor save it (the next search rebuilds)
            shutil.rmtree(tmp, ignore_errors=True)
            self._bm25, self._ids, self._revision = bm25, ids, None
            return
        (tmp / "meta.json").write_text(json.dumps({"revision": revision, "ids": ids}))
        # swap in the new index; a concurrent reader keeps what it already loaded. Another process
        # may be swapping in its own rebuild at the same moment (the soak test's readers did): the
        # index is a cache, so whichever lands is kept and this one is dropped.
        old = self.dir.with_name(f".{_DIR}-old-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.dir, old)
        except FileNotFoundError:  # none yet, or another process moved it away first
            pass
        try:
            os.replace(tmp, self.dir)
        except OSError:  # another process's rebuild landed in between (a non-empty folder is in place)
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        self._bm25, self._ids, self._revision = bm25, ids, revision

