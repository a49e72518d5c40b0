"""Fail fast without the Hugging Face Hub.

Without network, ``from_pretrained("org/name")`` retries every file for minutes (36 retry lines and
146 s for the default preset, measured here). Before a Hub id is loaded, mmrag asks once per process
whether the Hub answers (a TCP connection with a short timeout); when it does not, a model in the
local cache loads offline and any other fails at once with one line that says what to do.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mmrag.retrievers.errors import ModelLoadError

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``, default huggingface.co) accepts a connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_cached(model_id: str) -> bool:
    """Whether a snapshot of ``model_id`` is in the local Hugging Face cache."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    for name in ("config.json", "model_index.json", "preprocessor_config.json"):
        if isinstance(try_to_load_from_cache(model_id, name), str):
            return True
    try:  # an adapter repository (IP-Adapter) may hold neither file at its root
        return any(repo.repo_id == model_id for repo in scan_cache_dir().repos)
    except Exception:  # no cache folder yet
        return False


def check_hub_model(model_id: str) -> None:
    """Refuse at once a Hub ``model_id`` that cannot load: the Hub is unreachable (or
    ``HF_HUB_OFFLINE`` is set) and the model is not cached. A cached model with the Hub unreachable
    switches this process to offline loading, so that transformers and diffusers do not retry."""
    if Path(model_id).expanduser().exists() or model_id.count("/") > 1:
        return  # a local folder (or a path-like id that is not a Hub repository)
    offline = _offline_env() or not hub_reachable()
    if not offline:
        return
    if not is_cached(model_id):
        why = "HF_HUB_OFFLINE is set" if _offline_env() else "the Hugging Face Hub is not reachable"
        raise ModelLoadError(
            f"Cannot load {model_id!r}: {why} and it is not in the local cache. Use `--config tiny` (offline "
            "models built locally), point the config at a local model folder, or run where the Hub is reachable."
        )
    if not _offline_env():
        logger.info("The Hub is not reachable: loading %r from the local cache", model_id)
        os.environ["HF_HUB_OFFLINE"] = "1"
        _refresh_offline_flag()


def _refresh_offline_flag() -> None:
    """huggingface_hub reads HF_HUB_OFFLINE at import; update the constant it consults."""
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
