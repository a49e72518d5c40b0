"""Config files: defaults, presets, unknown keys, bad values, overrides, tiny models on first use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmrag.pipelines.config import CONFIG_DIR, Config, load_config
from mmrag.retrievers import ConfigError, ModelLoadError


def test_default_preset_equals_the_code_defaults():
    assert load_config("default") == Config() == load_config(None)
    # every section and key of the file is a real field (the file documents all of them)
    raw = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    assert set(raw) <= set(Config.model_fields)


def test_tiny_preset_names_tiny_models():
    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    assert cfg.embedder.model == "tiny:clip"


def test_unknown_key_names_the_key_and_lists_valid_ones(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("embedder:\n  modle: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "embedder.modle" in msg and "model" in msg and "batch_size" in msg and str(f) in msg
    with pytest.raises(ConfigError, match="unknown key `kbb`.*embedder, ingest, kb"):
        load_config({"kbb": {}})


def test_bad_values_and_bad_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"`embedder.batch_size`.*greater than 0.*-1"):
        load_config({"embedder": {"batch_size": -1}})
    with pytest.raises(ConfigError, match="dtype"):
        load_config({"embedder": {"dtype": "float8"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("kb: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="presets"):
        load_config("no-such-preset")


def test_overrides_win_and_none_is_a_value():
    cfg = load_config("tiny", {"kb.path": "elsewhere", "vlm.seed": 3, "kb.lock_timeout": 2.5})
    assert cfg.kb.path == "elsewhere" and cfg.kb.lock_timeout == 2.5 and cfg.vlm.seed == 3
    assert load_config(cfg, {"vlm.seed": None}).vlm.seed is None  # None overrides too
    assert cfg.ingest.batch_size == load_config("tiny").ingest.batch_size
    with pytest.raises(ConfigError, match="kb.nope"):
        load_config(None, {"kb.nope": 1})


def test_tiny_model_is_built_on_first_use(tmp_path):
    cfg = load_config("tiny", {"tiny_models.cache_dir": str(tmp_path / "cache")})
    path = Path(cfg.resolve_model("tiny:clip"))
    assert path == (tmp_path / "cache" / "clip") and (path / "config.json").is_file()
    mtime = (path / "config.json").stat().st_mtime_ns
    assert Path(cfg.resolve_model("tiny:clip")) == path and (path / "config.json").stat().st_mtime_ns == mtime
    assert cfg.resolve_model(str(path)) == str(path)  # a local folder passes through
    with pytest.raises(ModelLoadError, match="not in the local cache"):  # the tests run offline
        cfg.resolve_model("someone/not-a-cached-model")


def test_overrides_do_not_touch_the_callers_dict():
    source = {"kb": {"path": "a"}}
    assert load_config(source, {"kb.path": "b", "kb.url": "http://127.0.0.1:1"}).kb.path == "b"
    assert source == {"kb": {"path": "a"}}


def test_a_config_passed_on_keeps_which_keys_were_set():
    """from_config(load_config(...)) must not turn defaults into explicit choices: an existing KB
    keeps its own embedder unless the config names one."""
    cfg = load_config(None, {"kb.path": "x"})
    again = load_config(cfg, {"vqa.k": 5})
    assert again.embedder.model_fields_set == set() and again.vqa.k == 5 and again.kb.path == "x"
    assert "model" in load_config(load_config("tiny")).embedder.model_fields_set
