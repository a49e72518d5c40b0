"""README.md's Python quick-starts run as written (in a scratch folder, offline)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_starts_run(tmp_path, monkeypatch, tiny_models_dir):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 3, "ingest + search, ask, draw"
    monkeypatch.chdir(tmp_path)
    # the "tiny" preset builds into ~/.cache; point it at the session's already-built models
    from mmrag.pipelines import config as config_module

    real = config_module.load_config
    monkeypatch.setattr(config_module, "load_config",
                        lambda source=None, overrides=None: real(source, {**(overrides or {}),
                                                                          "tiny_models.cache_dir": str(tiny_models_dir)}))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "drawing.png").is_file() and (tmp_path / "my-kb" / "mmrag-kb.json").is_file()
    assert namespace["report"].added > 0 and namespace["out"].references
