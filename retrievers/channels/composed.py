"""The ``composed`` channel: a reference image plus a modifier text ("this, but blue"), training-free.

Three methods from the composed image retrieval literature (``composed_method``):

- ``weimocir`` (Wu et al. 2024): ``q = N((1-a) v + a t)``; ``score = (1-b) cos(q, image) + b cos(q, text)``.
  The paper scores the whole gallery; so do we up to ``EXACT_GALLERY_MAX_RECORDS`` records, and
  over the union of both ANN lists beyond (which misses items strong on neither alone).
- ``pdv`` (Tursun et al., WACV 2026): ``d = t_comp - t_ref``; ``v' = v + a_I d``; ``t' = t_ref + a_T d``;
  ``q = N((1-b) v' + b t')``, one ANN query over the images.
- ``cirevl`` (Karthik et al., ICLR 2024): caption the reference, rewrite the caption with the
  modifier (a VLM), and retrieve images by the edited text alone.

PDV and CIReVL need a description of the reference image: the query's ``reference_text``, or the
captioner a pipeline injects (a VLM).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Channel, ChannelQuery, Scored, by_score, dense_search, top_of_gallery, unit


class Composed(Channel):
    name, needs_text, needs_image = "composed", True, True

    def search(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        method = q.settings.composed_method
        if method == "weimocir":
            return self._weimocir(q, n, where)
        reference = q.query.reference_text
        if reference is None:
            if self.resources.captioner is None:
                raise ConfigError(f"composed_method={method!r} needs a description of the query image: "
                                  "pass Query(reference_text=...) or a retriever built with captioner=.")
            reference = self.resources.captioner(q.query.image)
        if method == "cirevl":
            return self._cirevl(q, reference, n, where)
        return self._pdv(q, reference, n, where)

    def _weimocir(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        s = q.settings
        fused = unit((1 - s.weimocir_alpha) * q.image_vector + s.weimocir_alpha * q.text_vector)
        if self.resources.exact(s):  # the paper scores the whole gallery
            images, texts, rows = self.resources.gallery.paired("images", "texts")  # rows: each image's text row
            paired = rows >= 0  # False only for a record a concurrent writer has half-written
            text_sims = np.zeros(len(rows))
            text_sims[paired] = (texts.vecs @ fused).astype(np.float64)[rows[paired]]
            score = (1 - s.weimocir_beta) * (images.vecs @ fused).astype(np.float64) + s.weimocir_beta * text_sims
            score[~paired] = -np.inf
            return top_of_gallery(self.kb, images, score, n, where, "images", q.pool)
        cand = dict(dense_search(self.kb, fused, "images", n, where, q.pool))
        cand.update(dense_search(self.kb, fused, "texts", n, where, q.pool))
        ids = q.pool.present("texts", q.pool.present("images", sorted(cand)))  # both halves written
        score = ((1 - s.weimocir_beta) * (q.pool.vectors("images", ids) @ fused)
                 + s.weimocir_beta * (q.pool.vectors("texts", ids) @ fused))
        return by_score(ids, score.tolist(), n)

    def _cirevl(self, q: ChannelQuery, reference: str, n: int, where: dict | None) -> Scored:
        rewriter = self.resources.rewriter
        if rewriter is None:
            raise ConfigError("composed_method='cirevl' needs a rewriter (caption, modifier) -> text; "
                              "build the retriever with rewriter= (a pipeline injects a VLM).")
        edited = rewriter(reference, q.query.text).strip() or q.query.text  # the paper falls back to the modifier
        return dense_search(self.kb, self.kb.embedder.embed_texts([edited])[0], "images", n, where, q.pool)

    def _pdv(self, q: ChannelQuery, reference: str, n: int, where: dict | None) -> Scored:
        s, rewriter = q.settings, self.resources.rewriter
        composed = (rewriter(reference, q.query.text) if rewriter is not None
                    else s.pdv_compose.format(reference=reference, modifier=q.query.text))
        t_ref, t_comp = self.kb.embedder.embed_texts([reference, composed])
        d = t_comp - t_ref
        vec = unit((1 - s.pdv_beta) * (q.image_vector + s.pdv_alpha_image * d)
                   + s.pdv_beta * (t_ref + s.pdv_alpha_text * d))
        return dense_search(self.kb, vec, "images", n, where, q.pool)
