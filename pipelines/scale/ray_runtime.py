"""Starting or joining Ray, and the checks around it.

``address=None`` starts a local Ray for this process (what ``--ray`` alone does); ``"auto"`` or
``"ray://HOST:10001"`` joins a running cluster. Ray is imported here, on first use, so the
library and the command line work without the extra.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from mmrag.retrievers.errors import ConfigError, MissingExtraError

logger = logging.getLogger(__name__)

INSTALL_COMMAND = 'pip install "mmrag[ray]"'


def require_ray() -> Any:
    """``ray`` with Ray Data, or :class:`MissingExtraError` with the pip command."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise MissingExtraError(f"--ray needs Ray Data (ray[data]), not installed here. Install it with: "
                                f"{INSTALL_COMMAND}")
    import ray
    import ray.data  # noqa: F401  (checks the data extra imports)

    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Connect to Ray (or reuse the connection this process has); returns the ``ray`` module.

    A local Ray started here gets ``num_cpus`` (default: what the machine has) and keeps its logs
    off the terminal; Ray Data's own progress bars are turned off, mmrag draws one with the total.
    """
    ray = require_ray()
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ConfigError(f"`ray_address` must be 'auto', 'ray://HOST:PORT', or None to start a local Ray, "
                          f"got {address!r}.")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                  "logging_level": logging.WARNING}
        if address is None:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"Cannot reach the Ray cluster at `ray_address` {address!r} ({e}); is it running "
                              "(`ray start --head`)? Leave the address out to start a local Ray.") from None
    if not logging.getLogger("mmrag").isEnabledFor(logging.INFO):  # -v / MMRAG_LOG shows Ray Data's plans
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # outputs and reports in the source's order
    # an exception raised in a task or actor reaches the driver as itself (Ray Data otherwise raises
    # UserCodeException, which loses it on the way back), so an mmrag error prints as its own one line
    context.raise_original_map_exception = True
    return ray


def gpus_available(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def actor_cpus(ray: Any, concurrency: int, requested: float | None) -> float:
    """CPUs each of ``concurrency`` actors asks for: ``requested``, or 1 while that leaves the
    cluster a CPU for the tasks that feed them. Actors hold their CPUs for the whole run, so a pool
    that takes every CPU starves its own read tasks and the run waits forever (2 actors on a
    2-CPU machine did, at 1 CPU each)."""
    if requested is not None:
        return requested
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, max(total - 1.0, total / 2) / concurrency)
