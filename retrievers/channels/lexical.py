"""The ``lexical`` channel: BM25 over record texts (the index is ``retrievers/lexical.py``)."""

from __future__ import annotations

from ..lexical import LexicalIndex
from .base import Channel, ChannelQuery, Scored


class Lexical(Channel):
    """Exact word match, which catches the rare names dual encoders blur. Scores are BM25 (> 0)."""

    name, needs_text = "lexical", True

    def __init__(self, resources):
        super().__init__(resources)
        self._index: LexicalIndex | None = None

    def prefix_stable(self, q: ChannelQuery, where: dict | None) -> bool:
        return where is None  # a filter is applied after scoring, so a short list may lose members

    def search(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        if self._index is None:
            self._index = LexicalIndex(self.kb)
        return self._index.search(q.query.text, n, where)
