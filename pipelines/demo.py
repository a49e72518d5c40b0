"""``mmrag demo``: the newcomer's first run, on embedded Chroma and tiny offline models."""

from __future__ import annotations

import sys
from pathlib import Path

from .components import open_knowledge_base
from .config import Config, load_config
from .sample_data import make_sample_set


def run_demo(config: Config, out: Path, *, log=None) -> dict:
    """Generate the sample set, ingest it into ``out/kb``, and print what the KB holds.

    Returns the KB's info dict. Runs again without duplicating anything.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    config = load_config(config, {"kb.path": str(out / "kb")})
    log(f"1/3 resolving the embedder {config.embedder.model!r} (tiny models are built on first use)")
    kb = open_knowledge_base(config)
    log("2/3 drawing the sample set (seeded, procedural entities)")
    sample = make_sample_set(out / "sample")
    log(f"3/3 ingesting {sample} into {kb.path}")
    report = kb.ingest(sample, batch_size=config.ingest.batch_size, progress=sys.stderr.isatty())
    print(report.summary())
    info = kb.info()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return info
