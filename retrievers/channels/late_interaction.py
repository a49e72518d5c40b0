"""The ``late_interaction`` channel: ColPali-style multi-vector retrieval, made fast with MUVERA.

The query text becomes token vectors (the KB's multi-vector encoder) and their FDE; an ANN search
over the records' FDEs (``kb.multivector``) finds ``late_interaction_candidates`` candidates, and
exact Chamfer similarity (MaxSim: the sum over query tokens of the best dot product with any of
the record's token vectors) over the stored token vectors orders them. The score is that Chamfer
similarity.
"""

from __future__ import annotations

from ..muvera import chamfer_many
from .base import Channel, ChannelQuery, Scored, by_score


class LateInteraction(Channel):
    name, needs_text = "late_interaction", True

    def unavailable(self) -> str | None:
        if self.kb.multivector is None:
            return ("it has no late-interaction index. Create the KB with one: "
                    "KnowledgeBase.open(path, embedder, late_interaction=MODEL), or "
                    "`mmrag ingest SOURCE --kb NEW_DIR --late-interaction MODEL`.")
        return None

    def search(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        store = self.kb.multivector
        tokens = self.kb.multivector_encoder.embed_queries([q.query.text])[0]
        candidates = store.query(store.fde.encode_queries([tokens])[0], max(n, q.settings.late_interaction_candidates),
                                 where)
        stored = store.tokens([rid for rid, _ in candidates])
        ids = [rid for rid, _ in candidates if rid in stored]  # a record deleted meanwhile drops out
        if not ids:
            return []
        return by_score(ids, chamfer_many(tokens, [stored[i] for i in ids]).tolist(), n)
