"""Past one machine, on Ray Data (the ``mmrag[ray]`` extra): distributed ingestion
(:mod:`.ingest`), batch answering and drawing (:mod:`.batch`, its inputs in :mod:`.items`), and the
evaluations run as batch jobs (:mod:`.batch_eval`).

The KB's write path stays what it is: journaled, idempotent, one writer (the driver). Ray scales
the expensive part: reading and decoding, embedding, and generation, in tasks and actor pools.
"""

from __future__ import annotations
