"""Where a bridge finds its peers: the Zenoh session settings (``ZenohSettings``).

The default needs no configuration and stays on this machine (peer mode, an
ephemeral port of 127.0.0.1, multicast scouting); a deployment names its endpoints.
The fields and examples: docs/network.md, "Zenoh settings".
"""

import atexit
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from ..checks import check_path
from ..errors import BridgeError

MODES = ("peer", "client", "router")
_LOOPBACK = "tcp/127.0.0.1:0"


@dataclass(frozen=True)
class ZenohSettings:
    """``mode``: one of MODES; ``connect`` / ``listen``: an endpoint or a list of them
    (str like ``"tcp/10.0.0.5:7447"``); ``scouting``: None, True or False;
    ``config_file``: None or the path of a Zenoh json5 config (a str or os.PathLike)."""

    mode: str = "peer"
    connect: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()
    scouting: bool | None = None  # multicast scouting; None: on only when no endpoint is given
    config_file: str | None = None  # a Zenoh json5 config applied first

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"zenoh mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("connect", "listen"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
                raise TypeError(f"zenoh {name}: a list of endpoints like 'tcp/127.0.0.1:7447', not "
                                f"{type(value).__name__}")
            value = tuple(value)
            if not all(isinstance(e, str) and "/" in e for e in value):
                raise ValueError(f"zenoh {name}: a list of endpoints like 'tcp/127.0.0.1:7447', "
                                 f"not {value!r}")
            object.__setattr__(self, name, value)
        if self.scouting not in (None, True, False):
            raise ValueError(f"zenoh scouting must be true or false, not {self.scouting!r}")
        if self.config_file is not None:
            object.__setattr__(self, "config_file", check_path("config_file", self.config_file))

    @classmethod
    def of(cls, value) -> "ZenohSettings":
        """Settings from None (the defaults), a mapping of the fields, or settings."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown zenoh setting(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(sorted(known))}")
            return cls(**value)
        raise TypeError(f"zenoh settings: a mapping or ZenohSettings, not {type(value).__name__}")

    def to_config(self):
        zenoh = import_zenoh()
        config = zenoh.Config.from_file(self.config_file) if self.config_file else zenoh.Config()
        # no endpoints: this machine only; else Zenoh's own default listeners (every
        # interface, an ephemeral port), which gossip tells peers about
        listen = self.listen or (() if self.connect or self.config_file else (_LOOPBACK,))
        scouting = self.scouting if self.scouting is not None else not (self.connect or self.listen)
        config.insert_json5("mode", json.dumps(self.mode))
        if listen:
            config.insert_json5("listen/endpoints", json.dumps(list(listen)))
        if self.connect:
            config.insert_json5("connect/endpoints", json.dumps(list(self.connect)))
        config.insert_json5("scouting/multicast/enabled", json.dumps(scouting))
        if not self.config_file:
            # Zenoh's own shared memory leaves /dev/shm/*.zenoh files behind workers that end
            # with os._exit (multiprocessing's), and frames on one machine need no bridge
            config.insert_json5("transport/shared_memory/enabled", "false")
        return config


def json_replies(replies) -> list[tuple[str, object]]:
    """(key, decoded JSON) of each good reply to a Zenoh get; errors and non-JSON skipped."""
    answers = []
    for reply in replies:
        if reply.ok is not None:
            try:
                answers.append((str(reply.ok.key_expr), json.loads(reply.ok.payload.to_bytes())))
            except ValueError:
                continue
    return answers


def import_zenoh():
    """The zenoh module, imported when a bridge first needs it: it is an optional
    dependency (the ``net`` extra), so importing multiqueue must not need it."""
    try:
        import zenoh
    except ImportError:
        raise BridgeError("bridging needs Zenoh's Python API: pip install 'multiqueue[net]' "
                          "(the package eclipse-zenoh)") from None
    return zenoh


# One session per settings per process: the bridge blocks of a worker share it, so a
# host that listens on a fixed port binds it once.
_sessions: dict[ZenohSettings, list] = {}  # settings -> [session, users]
_lock = threading.Lock()


def open_session(settings: ZenohSettings):
    """This process's Zenoh session for ``settings`` (opened on first use; give it
    back with :func:`close_session`).  Sessions still open at exit are closed then
    (a process with an open session does not exit otherwise)."""
    zenoh = import_zenoh()
    with _lock:
        entry = _sessions.get(settings)
        if entry is None:
            try:
                entry = _sessions[settings] = [zenoh.open(settings.to_config()), 0]
            except Exception as e:  # zenoh.ZError and config errors: say which settings failed
                raise BridgeError(f"could not open a Zenoh session with {settings}: {e}") from None
        entry[1] += 1
        return entry[0]


def close_session(session) -> None:
    """Give back a session from :func:`open_session`; the last user closes it."""
    with _lock:
        for settings, entry in list(_sessions.items()):
            if entry[0] is session:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _sessions[settings]
                break
    _close_quietly(session)


def _close_quietly(session) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - closing twice, or at interpreter shutdown
        pass


@atexit.register
def _close_sessions() -> None:
    with _lock:
        sessions = [entry[0] for entry in _sessions.values()]
        _sessions.clear()
    for session in sessions:
        _close_quietly(session)
