"""Beyond one machine: bridge ports over Zenoh (see docs/network.md)."""

from .bridge import BridgeSink, BridgeSource
from .settings import BridgeError, ZenohSettings
from .wire import WireError

__all__ = ["BridgeError", "BridgeSink", "BridgeSource", "WireError", "ZenohSettings"]
