"""Retrieval channels behind one interface (:class:`Channel`); the retriever fuses them.

``CHANNEL_TYPES`` maps each name of ``settings.CHANNELS`` to its class. A new channel is a
subclass of :class:`Channel` registered here (and named, with what it needs, in ``CHANNELS``).
"""

from __future__ import annotations

from .base import CandidatePool, Channel, ChannelQuery, ChannelResources, Scored
from .composed import Composed
from .dense import ImageToImage, ImageToText, TextToImage, TextToText
from .late_interaction import LateInteraction
from .lexical import Lexical

CHANNEL_TYPES: dict[str, type[Channel]] = {
    c.name: c for c in (TextToImage, TextToText, ImageToImage, ImageToText, Composed, Lexical, LateInteraction)
}

__all__ = ["CHANNEL_TYPES", "CandidatePool", "Channel", "ChannelQuery", "ChannelResources", "Scored"]
