"""A knowledge base's HNSW settings: chosen when it is created, ``ef_search`` raised as it grows.

Chroma's index (chroma-core's hnswlib) has three settings. ``max_neighbors`` (M) and
``ef_construction`` shape the graph and are fixed when a collection is created; ``ef_search``, the
candidate list each query keeps, trades recall for latency and can be changed later. Recall at a
given ``ef_search`` falls as the collection grows, so a KB starts at ``RECORD_HNSW`` and, after an
ingestion leaves it past a size in :data:`EF_SEARCH_BY_SIZE` (a table per ``max_neighbors``), gets
that row's ``ef_search`` (:func:`tune`, under the writer lock). The choice is recorded in the
manifest (``"hnsw"``) with the measurement it came from, :data:`MEASUREMENT`.

Chroma 1.5.9, measured here: ``collection.modify(configuration={"hnsw": {"ef_search": n}})`` is
stored at once (every client reads it back), but a process that has already loaded the index keeps
searching with the ``ef_search`` it loaded it with: the raised one applies from the next process
that opens the KB (embedded mode), or after a restart of the server. Chroma has no per-query
``ef_search`` (chroma-core/chroma#2176, open); the value is passed to hnswlib when an index is
loaded (chroma-core/chroma#4097). ``max_neighbors`` given to ``modify`` is stored as well, silently,
while the graph keeps the one it was built with: it is never modified here.

An explicit setting (``KnowledgeBase.open(hnsw=...)``, the config's ``kb.hnsw``) wins: a key the
creator set is recorded as explicit and never changed. ``ef_search`` is only ever raised.
"""

from __future__ import annotations

import logging
from typing import Any

from .manifest import now
from .store import HNSW_KEYS, RECORD_HNSW, VectorStore

log = logging.getLogger(__name__)

# Chroma's own defaults, for the keys RECORD_HNSW leaves to it.
CHROMA_HNSW = {"ef_search": 100, "ef_construction": 100, "max_neighbors": 16}
# Per max_neighbors, (up to this many records, ef_search), the last row for any size: the smallest
# ef_search of 200, 400, 800, 1600 whose recall@10 measured >= 0.995 (mean, both query sets of
# benchmarks/hnsw_curve.py, ef_construction 100) at the row's size: 0.99 with a margin, as three 100k
# builds of the same settings gave 0.989, 0.9925 and 0.997. Past 100k records nothing is measured: those
# rows extrapolate (recall fell ~0.004 per doubling of the size). A graph with another max_neighbors
# takes the table of the largest one below it (the smallest's, below all).
EF_SEARCH_BY_SIZE: dict[int, tuple[tuple[int | None, int], ...]] = {
    16: ((10_000, 400), (30_000, 800), (200_000, 1600), (None, 3200)),
    32: ((50_000, 400), (300_000, 800), (None, 1600)),
}
MEASUREMENT = ("benchmarks/hnsw_curve.py, 2026-12-01, AMD EPYC 2 cores, Chroma 1.5.9: 512-d unit vectors of intrinsic "
               "dimension 64, ef_construction 100, recall@10 vs exact numpy (text / record queries). max_neighbors 32, "
               "ef_search 400: 1.000 / 1.000 at 10k, 1.000 / 0.9995 at 30k, 0.9965 / 0.9985 at 50k, 0.9925 / 0.9955 "
               "at 100k; ef_search 800: 0.999 / 0.9995 at 100k. max_neighbors 16, ef_search 400: 1.000 / 0.9995 at "
               "10k, 0.9715 / 0.990 at 30k; 800: 0.9975 / 0.9975 at 30k, 0.9935 / 0.998 at 50k, 0.982 / 0.988 at "
               "100k; 1600: 0.998 / 0.9985 at 100k. Query p50 at 100k, relative to max_neighbors 16 at ef_search "
               "400: 32 at 400 1.49x, 32 at 800 2.26x, 16 at 1600 2.43x")
# What every KB created before the manifest recorded its settings got, whoever asked: such a KB is
# tuned when its collections still have it, and taken for explicitly set otherwise.
LEGACY_EF_SEARCH = 400


def table_for(max_neighbors: int, rules: dict[int, tuple[tuple[int | None, int], ...]] | None = None):
    """The rows of ``rules`` (default :data:`EF_SEARCH_BY_SIZE`) for a graph with ``max_neighbors``."""
    rules = EF_SEARCH_BY_SIZE if rules is None else rules
    return rules[max((m for m in rules if m <= max_neighbors), default=min(rules))]


def ef_search_for(count: int, max_neighbors: int = RECORD_HNSW["max_neighbors"],
                  rules: dict[int, tuple[tuple[int | None, int], ...]] | None = None) -> int:
    """The ``ef_search`` the rule gives a KB of ``count`` records whose graph has ``max_neighbors``:
    the first row whose size covers it."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"`count` must be a non-negative integer, got {count!r}")
    return next(ef for up_to, ef in table_for(max_neighbors, rules) if up_to is None or count <= up_to)


def describe_row(max_neighbors: int, ef_search: int) -> str:
    """The rule's row that gives ``ef_search``, in words (for the manifest)."""
    table = table_for(max_neighbors)
    for i, (up_to, ef) in enumerate(table):
        if ef == ef_search:
            above = table[i - 1][0] if i else None
            size = ("for any number of" if up_to is None and above is None else f"above {above:,}" if up_to is None
                    else f"for {0 if above is None else above + 1:,} to {up_to:,}")
            return f"max_neighbors {max_neighbors}: ef_search {ef} {size} records"
    return f"ef_search {ef_search} found on the collections, above the rule's: kept"


def creation_record(explicit: dict[str, int] | None) -> dict[str, Any]:
    """The manifest's ``"hnsw"`` section for a new KB created with ``explicit`` settings."""
    explicit = dict(explicit or {})
    config = {**CHROMA_HNSW, **RECORD_HNSW, **explicit}
    return {"explicit": sorted(explicit), **{k: config[k] for k in HNSW_KEYS}, "tuned": []}


def stored(store: VectorStore) -> list[dict]:
    """The HNSW configuration each record collection holds now, read afresh (a handle keeps the one
    it was opened with; another process may have tuned the KB since)."""
    # configuration_json, not .configuration: the same values without parsing the embedding function
    return [(store.client.get_collection(store.names[w], embedding_function=None).configuration_json or {})
            .get("hnsw") or {} for w in ("images", "texts")]


def tune(record: dict[str, Any] | None, store: VectorStore, count: int) -> dict[str, Any] | None:
    """Raise the record collections' ``ef_search`` to the rule's for ``count`` records, unless it
    was set explicitly. ``record`` is the manifest's ``"hnsw"`` section (None for a KB created
    before there was one). Returns the section to write back, or None when nothing changed.

    Call it under the KB's writer lock: two tunings must not interleave."""
    configs = stored(store)
    # the smallest of the two: a tuning killed half way raised only one
    have = min(int(c.get("ef_search") or CHROMA_HNSW["ef_search"]) for c in configs)
    graph = {k: int(configs[0].get(k) or CHROMA_HNSW[k]) for k in ("max_neighbors", "ef_construction")}
    if record is None:  # a KB older than the record: its settings are what its collections hold
        if have != LEGACY_EF_SEARCH:
            return None  # someone chose another value: leave it alone
        record = {"explicit": [], "ef_search": have, **graph, "tuned": [], "legacy": True}
    if "ef_search" in record["explicit"]:
        return None
    target = max(ef_search_for(count, graph["max_neighbors"]), have)
    if target == record["ef_search"] == have:
        return None
    for which, config in zip(("images", "texts"), configs):
        if int(config.get("ef_search") or CHROMA_HNSW["ef_search"]) < target:
            # through the store's own handle, so that what it caches (and copies, see parts.py) follows
            store.collection(which).modify(configuration={"hnsw": {"ef_search": target}})
    entry = {"at": now(), "count": count, "ef_search": target, "previous": record["ef_search"], **graph,
             "rule": describe_row(graph["max_neighbors"], target), "measurement": MEASUREMENT}
    log.info("HNSW ef_search %s -> %s at %s records", record["ef_search"], target, count)
    return {**record, "ef_search": target, "tuned": [*record["tuned"], entry]}
