"""The live web dashboard of a running graph (``mq dashboard DOMAIN``)."""

from .server import Dashboard, downsample

__all__ = ["Dashboard", "downsample"]
