"""The four dense channels: the query's text or image vector against the stored image or text vectors.

Plain, they are one ANN query. With ``hubness`` set, QB-Norm or DBNorm (``hubness.py``)
re-scores them: over every stored vector (``scoring_scope="gallery"``, as the papers define it) or
over the ANN candidates only (the approximation for large KBs).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..hubness import Normaliser, ann_activation, bank_stats
from .base import Channel, ChannelQuery, Scored, by_score, dense_search, top_of_gallery


class DenseChannel(Channel):
    """Cosine similarity between one side of the query and one collection."""

    query_side: ClassVar[str]  # "text" | "image"
    collection: ClassVar[str]  # "images" | "texts"

    def prefix_stable(self, q: ChannelQuery, where: dict | None) -> bool:
        return q.settings.hubness is None

    def _vector(self, q: ChannelQuery) -> np.ndarray:
        return q.text_vector if self.query_side == "text" else q.image_vector

    def search(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        s, vec = q.settings, self._vector(q)
        if s.hubness is None:
            return dense_search(self.kb, vec, self.collection, n, where, q.pool)
        norm = Normaliser.resolve(s.hubness, query=self.query_side,
                                  gallery="image" if self.collection == "images" else "text", beta=s.hubness_beta,
                                  gallery_beta=s.hubness_gallery_beta, dynamic=s.hubness_dynamic)
        if self.resources.exact(s):
            return self._hubness_gallery(norm, s.hubness_bank_size, vec, n, where, q)
        return self._hubness_candidates(norm, s.hubness_bank_size, vec, n, where, q)

    def _hubness_gallery(self, norm: Normaliser, bank_size: int, vec: np.ndarray, n: int, where,
                         q: ChannelQuery) -> Scored:
        """QB-Norm / DBNorm as the papers define them: every gallery item normalised. ``log Z`` and
        the activation set come from the whole gallery, and the DIS gate from the query's top-1
        over it. A ``where`` filter only restricts which items are returned."""
        gal = self.resources.gallery.vectors(self.collection)
        if not len(gal.ids):
            return []  # an empty KB has no banks to sample
        banks = self.resources.banks(bank_size)
        stats = [gal.cached(("hubness", m, beta, banks.token),  # on this snapshot: its sizes match
                            lambda m=m, beta=beta: bank_stats(banks.vectors[m], banks.ids[m], gal, beta))
                 for m, beta in norm.factors]
        scores = norm.gallery_scores((gal.vecs @ vec).astype(np.float64), stats)  # (N,)
        return top_of_gallery(self.kb, gal, scores, n, where, self.collection, q.pool)

    def _hubness_candidates(self, norm: Normaliser, bank_size: int, vec: np.ndarray, n: int, where,
                            q: ChannelQuery) -> Scored:
        """The approximation for large KBs: only the ANN candidates rescored."""
        hits = dense_search(self.kb, vec, self.collection, n, where, q.pool)
        if not hits:
            return hits
        banks = self.resources.banks(bank_size)
        ids = [i for i, _ in hits]
        on = [True] * len(norm.factors)
        if norm.dynamic:
            store = self.kb.vectors
            # the gate looks at the query's top-1 in the whole gallery, as in exact scope
            top1 = ids[0] if where is None else store.query(self.collection, [vec], 1)["ids"][0][0]
            on = [top1 in self.resources.gallery.get(
                      ("activation", self.collection, m, banks.token),
                      lambda m=m: ann_activation(store, self.collection, banks.vectors[m], banks.ids[m]))
                  for m, _ in norm.factors]
        new = norm.candidate_scores(np.array([sc for _, sc in hits]), ids, q.pool.vectors(self.collection, ids),
                                    banks, on)
        return by_score(ids, new.tolist(), len(ids))


class TextToImage(DenseChannel):
    name, needs_text, query_side, collection = "text_to_image", True, "text", "images"


class TextToText(DenseChannel):
    name, needs_text, query_side, collection = "text_to_text", True, "text", "texts"


class ImageToImage(DenseChannel):
    name, needs_image, query_side, collection = "image_to_image", True, "image", "images"


class ImageToText(DenseChannel):
    name, needs_image, query_side, collection = "image_to_text", True, "image", "texts"
