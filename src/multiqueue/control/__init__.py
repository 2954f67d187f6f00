"""Control: the message bus, the topics blocks and tools agree on, the domain log."""

from .bus import MAX_MESSAGE, Bus, Message, Subscription

__all__ = ["MAX_MESSAGE", "Bus", "Message", "Subscription"]
