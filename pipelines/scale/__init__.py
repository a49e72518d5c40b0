"""Past one machine, on Ray Data (the ``mmrag[ray]`` extra): distributed ingestion
(:mod:`.ingest`) and batch answering and drawing (:mod:`.batch`).

The KB's write path stays what it is: journaled, idempotent, one writer (the driver). Ray scales
the expensive part: reading and decoding, embedding, and generation, in tasks and actor pools.
"""

from __future__ import annotations
