"""The names of the bus topics the runtime, the tools and the blocks agree on."""

import re

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,29}")  # the queue name is "b-" + topic (31 at most)

STATUS = "status"  # status events: graph and block started / failed / restarted / stopped, drops
ERRORS = "errors"  # failures, also published on STATUS
GRAPH_CONTROL = "ctl"  # graph commands: stop, pause, resume


def check_topic(topic) -> None:
    """ValueError unless ``topic`` is 1-29 letters, digits, '_' or '-'."""
    if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}: 1-29 letters, digits, '_' or '-'")


def inbox_topic(name: str) -> str:
    """The topic of ``name``'s inbox, ``to-<name>`` (the topic check then refuses a name
    that is not 1-26 letters, digits, '_' or '-'); ValueError for a name that is no str."""
    if not isinstance(name, str):  # ValueError, as for any invalid topic
        raise ValueError(f"invalid inbox name {name!r}: a str of 1-26 letters, digits, '_' or '-'")
    return f"to-{name}"


def control_topic(block: str) -> str:
    """The topic a block takes commands on (set / get / pause / resume / stop)."""
    return f"ctl-{block}"
