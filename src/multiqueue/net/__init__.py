"""Beyond one machine: bridge ports over Zenoh (see docs/network.md)."""

from .bridge import BridgeSink, BridgeSource
from .settings import ZenohSettings

__all__ = ["BridgeSink", "BridgeSource", "ZenohSettings"]
