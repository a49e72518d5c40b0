"""``mmrag.client``: the HTTP client of ``mmrag serve`` (see :mod:`mmrag.pipelines.client`)."""
from mmrag.pipelines.client import *  # noqa: F401,F403
from mmrag.pipelines.client import __all__  # noqa: F401
