"""The live web dashboard of a running graph (``mq dashboard DOMAIN``)."""

from .access import TOKEN_ENV, AccessError
from .server import Dashboard, downsample

__all__ = ["TOKEN_ENV", "AccessError", "Dashboard", "downsample"]
