"""Passage-level rerank inside retrieved documents: which part of an interleaved document matched.

A document is retrieved by its one vector, the mean of its parts' vectors (``kb/documents.py``).
This stage reads the parts' own vectors back (``kb.parts``) and scores each against the query, so
that a hit says which passage or image answered it, and RAG-VQA can put just those parts in the
prompt. After the paper's passage-level reranking, with the KB's dual encoder as the scorer.

A part's score is its cosine with the query's vector; for a query with both a text and an image,
the mean of the two cosines. Cosines across modalities run lower than within one (CLIP's modality
gap), so for a text query a passage tends to outscore an image of the same content: the scores
rank the parts of one document for one query, they are not calibrated across kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .query import DocumentPart

if TYPE_CHECKING:
    from .kb import KnowledgeBase


def best_parts(kb: KnowledgeBase, doc_ids: Sequence[str], query_vectors: Sequence[np.ndarray],
               k: int) -> dict[str, list[DocumentPart]]:
    """``{doc id: its k best parts, best first}`` (ties: the earlier part first). One read of the
    parts collection for all the documents."""
    if k <= 0 or not doc_ids or not query_vectors:
        return {}
    q = np.stack([np.asarray(v, dtype=np.float32) for v in query_vectors])  # (n_query_vectors, dim)
    out: dict[str, list[DocumentPart]] = {}
    for doc_id, parts in kb.parts.of(doc_ids).items():
        vectors = np.stack([p.vector for p in parts])  # (n_parts, dim), unit
        scores = (vectors @ q.T).mean(axis=1)  # (n_parts,): cosine, averaged over the query's vectors
        order = sorted(range(len(parts)), key=lambda i: (-scores[i], parts[i].index))[:k]
        out[doc_id] = [DocumentPart(index=parts[i].index, kind=parts[i].kind, score=float(scores[i]),
                                    text=parts[i].text,
                                    image=None if parts[i].image is None else str(kb.images.path(parts[i].image, doc_id)),
                                    source_path=parts[i].source_path)
                       for i in order]
    return out
