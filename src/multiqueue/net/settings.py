"""Where a bridge finds its peers: the Zenoh session settings (``ZenohSettings``).

The default needs no configuration and stays on this machine (peer mode, an
ephemeral port of 127.0.0.1, multicast scouting); a deployment names its endpoints,
and a secure one its TLS files, its login and its access rules (``TlsSettings``,
``AccessRules``), all mapped onto Zenoh's own mechanisms by ``to_config``.
The fields and examples: docs/network.md, "Zenoh settings" and "Security".
"""

import atexit
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from ..checks import check_path
from ..errors import BridgeError

MODES = ("peer", "client", "router")
_LOOPBACK = "tcp/127.0.0.1:0"
MESSAGES = ("put", "delete", "declare_subscriber", "query", "reply", "declare_queryable",
            "liveliness_token", "liveliness_query", "declare_liveliness_subscriber")
FLOWS = ("ingress", "egress")
PERMISSIONS = ("allow", "deny")


def _strings(name: str, value, what: str) -> tuple[str, ...]:
    """A str or an iterable of non-empty str, as a tuple (settings stay hashable)."""
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"zenoh {name}: a list of {what}, not {type(value).__name__}")
    value = tuple(value)
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"zenoh {name}: a list of {what}, not {value!r}")
    return value


def _from_mapping(cls, name: str, value):
    """``cls`` from a mapping of its fields (unknown keys named), or as it is."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"zenoh {name}: a mapping, not {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"zenoh {name}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**value)


@dataclass(frozen=True)
class TlsSettings:
    """TLS on every link (Zenoh's ``transport/link/tls``).  ``ca``: the certificate of the
    authority that signed the peers' certificates (PEM); ``certificate`` / ``private_key``:
    this host's own (PEM; needed to accept TLS links, and to be named by mutual TLS);
    ``mutual``: every link shows a certificate both ways (set it on every host)."""

    ca: str | None = None  # required: without it no certificate can be checked
    certificate: str | None = None
    private_key: str | None = None
    mutual: bool = False

    def __post_init__(self):
        for name in ("ca", "certificate", "private_key"):
            value = getattr(self, name)
            if name == "ca" and value is None:
                raise ValueError("zenoh tls.ca: give the certificate of the authority that signed the "
                                 "hosts' certificates (PEM)")
            if value is not None:
                object.__setattr__(self, name, check_path(f"zenoh tls.{name}", value))
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("zenoh tls: give certificate and private_key together (this host's "
                             "certificate and the key it was made for)")
        if self.mutual not in (True, False):
            raise ValueError(f"zenoh tls.mutual must be true or false, not {self.mutual!r}")
        if self.mutual and self.certificate is None:
            raise ValueError("zenoh tls.mutual: each side shows its certificate; give certificate "
                             "and private_key")


@dataclass(frozen=True)
class AccessRule:
    """Who (``users``: login names, ``cert_names``: certificate common names, ``interfaces``:
    our network interfaces; what is left out matches any) may send or receive which
    ``messages`` (Zenoh's names; default all) on which ``keys`` (key expressions) in which
    ``flows`` (default both), with ``permission`` allow (default) or deny."""

    keys: tuple[str, ...] = ()  # required: at least one
    users: tuple[str, ...] = ()
    cert_names: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    messages: tuple[str, ...] = MESSAGES
    flows: tuple[str, ...] = FLOWS
    permission: str = "allow"

    def __post_init__(self):  # errors say "zenoh rule.<field>"; AccessRules says which rule
        for name, what in (("keys", "key expressions like 'mq/radio/**'"), ("users", "user names"),
                           ("cert_names", "certificate common names"), ("interfaces", "interface names"),
                           ("messages", f"Zenoh messages ({', '.join(MESSAGES)})"),
                           ("flows", "'ingress' / 'egress'")):
            object.__setattr__(self, name, _strings(f"rule.{name}", getattr(self, name), what))
        if not self.keys:
            raise ValueError("zenoh rule.keys: name at least one key expression")
        for key in self.keys:
            if key.startswith("/") or key.endswith("/") or "//" in key:
                raise ValueError(f"zenoh rule.keys: {key!r} is not a key expression "
                                 "(no leading, trailing or double '/')")
        for name, allowed in (("messages", MESSAGES), ("flows", FLOWS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"zenoh rule.{name}: {bad or 'none'} is not one of "
                                 f"{', '.join(allowed)}")
        if self.permission not in PERMISSIONS:
            raise ValueError(f"zenoh rule.permission must be allow or deny, not {self.permission!r}")

    def zenoh_parts(self, i: int) -> tuple[dict, dict, dict]:
        """Zenoh's (rule, subject, policy) for this rule, ``i`` its index."""
        rule = {"id": f"r{i}", "permission": self.permission, "flows": list(self.flows),
                "messages": list(self.messages), "key_exprs": list(self.keys)}
        subject = {"id": f"s{i}"}
        for name, zenoh_name in (("users", "usernames"), ("cert_names", "cert_common_names"),
                                 ("interfaces", "interfaces")):
            if getattr(self, name):
                subject[zenoh_name] = list(getattr(self, name))
        return rule, subject, {"id": f"p{i}", "rules": [f"r{i}"], "subjects": [f"s{i}"]}


@dataclass(frozen=True)
class AccessRules:
    """Zenoh's access control: ``rules`` (AccessRule or mappings of its fields), checked
    on every message to and from a peer; what no rule allows gets ``default`` (deny).
    An explicit deny wins over an allow."""

    rules: tuple[AccessRule, ...] = ()
    default: str = "deny"

    def __post_init__(self):
        if self.default not in PERMISSIONS:
            raise ValueError(f"zenoh access.default must be allow or deny, not {self.default!r}")
        if isinstance(self.rules, (str, bytes, Mapping)) or not isinstance(self.rules, Iterable):
            raise TypeError(f"zenoh access.rules: a list of rules, not {type(self.rules).__name__}")
        rules = []
        for i, rule in enumerate(self.rules):
            try:
                rules.append(_from_mapping(AccessRule, "rule", rule))
            except (TypeError, ValueError) as e:
                raise type(e)(str(e).replace("zenoh rule", f"zenoh access.rules[{i}]", 1)) from None
        object.__setattr__(self, "rules", tuple(rules))

    def to_json(self) -> str:
        parts = [rule.zenoh_parts(i) for i, rule in enumerate(self.rules)]
        return json.dumps({"enabled": True, "default_permission": self.default,
                           "rules": [p[0] for p in parts], "subjects": [p[1] for p in parts],
                           "policies": [p[2] for p in parts]})


@dataclass(frozen=True)
class ZenohSettings:
    """``mode``: one of MODES; ``connect`` / ``listen``: an endpoint or a list of them
    (str like ``"tcp/10.0.0.5:7447"``); ``scouting``: None, True or False;
    ``config_file``: None or the path of a Zenoh json5 config (a str or os.PathLike);
    ``tls``: None or TlsSettings (or a mapping of its fields); ``user`` with
    ``password_file`` or ``password_env``: this host's login; ``users_file``: Zenoh's
    ``user:password`` lines of who may log in here; ``access``: None or AccessRules
    (or a mapping).  The password itself is never a setting (nor in a repr or a log)."""

    mode: str = "peer"
    connect: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()
    scouting: bool | None = None  # multicast scouting; None: on only when no endpoint is given
    config_file: str | None = None  # a Zenoh json5 config applied first
    tls: TlsSettings | None = None
    user: str | None = None
    password_file: str | None = None  # read when the session opens, on the host that opens it
    password_env: str | None = None  # the name of an environment variable holding it
    users_file: str | None = None
    access: AccessRules | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"zenoh mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("connect", "listen"):
            value = _strings(name, getattr(self, name), "endpoints like 'tcp/127.0.0.1:7447'")
            if not all("/" in e for e in value):
                raise ValueError(f"zenoh {name}: a list of endpoints like 'tcp/127.0.0.1:7447', "
                                 f"not {value!r}")
            object.__setattr__(self, name, value)
        if self.scouting not in (None, True, False):
            raise ValueError(f"zenoh scouting must be true or false, not {self.scouting!r}")
        for name in ("config_file", "password_file", "users_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_path(name, getattr(self, name)))
        self._check_security()

    def _check_security(self) -> None:
        if self.tls is not None:
            object.__setattr__(self, "tls", _from_mapping(TlsSettings, "tls", self.tls))
            plain = [e for e in (*self.connect, *self.listen) if not e.startswith("tls/")]
            if plain:
                raise ValueError(f"zenoh connect/listen: with tls every endpoint is tls/..., not "
                                 f"{', '.join(plain)} (a plain link would bypass TLS)")
        for name in ("user", "password_env"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or ":" in value):
                raise ValueError(f"zenoh {name}: a non-empty name without ':', not {value!r}")
        given = [n for n in ("password_file", "password_env") if getattr(self, n) is not None]
        if (self.user is None) != (not given) or len(given) > 1:
            raise ValueError("zenoh user: give user with exactly one of password_file or password_env "
                             "(a password is never written in the settings)")
        if self.access is not None:
            object.__setattr__(self, "access", _from_mapping(AccessRules, "access", self.access))
            if self.users_file is None and any(r.users for r in self.access.rules):
                raise ValueError("zenoh access: rules naming users need users_file (a peer's user "
                                 "name is known only once it logged in here)")

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)
                 if getattr(self, f.name) != f.default}
        return f"ZenohSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def of(cls, value) -> "ZenohSettings":
        """Settings from None (the defaults), a mapping of the fields, or settings."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            if "password" in value:
                raise ValueError("zenoh password: never write a password in settings or a graph file; "
                                 "give password_file (a file only its owner reads) or password_env")
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
        listen = self.listen or self._default_listen()
        scouting = self.scouting if self.scouting is not None else not (self.connect or self.listen)
        config.insert_json5("mode", json.dumps(self.mode))
        if listen is not None:
            config.insert_json5("listen/endpoints", json.dumps(list(listen)))
        if self.connect:
            config.insert_json5("connect/endpoints", json.dumps(list(self.connect)))
        config.insert_json5("scouting/multicast/enabled", json.dumps(scouting))
        if not self.config_file:
            # Zenoh's own shared memory leaves /dev/shm/*.zenoh files behind workers that end
            # with os._exit (multiprocessing's), and frames on one machine need no bridge
            config.insert_json5("transport/shared_memory/enabled", "false")
        self._secure(config)
        return config

    def _default_listen(self) -> tuple[str, ...] | None:
        """No endpoints: this machine only; else Zenoh's own default listeners (every
        interface, an ephemeral port; None), which gossip tells peers about.  With TLS the
        same over TLS, or none for a host without a certificate (it cannot accept TLS)."""
        if self.config_file and not self.tls:
            return None
        if self.tls is None:
            return None if self.connect else (_LOOPBACK,)
        if self.tls.certificate is None:
            return ()
        return ("tls/[::]:0",) if self.connect else ("tls/127.0.0.1:0",)

    def _secure(self, config) -> None:
        """TLS files, the login and the access rules onto Zenoh's keys."""
        def put(key, value):
            config.insert_json5(key, json.dumps(value))
        if self.tls is not None:
            put("transport/link/protocols", ["tls"])  # no plain link, even to a gossiped locator
            put("transport/link/tls/root_ca_certificate", self.tls.ca)
            if self.tls.certificate is not None:
                for side in ("listen", "connect"):
                    put(f"transport/link/tls/{side}_certificate", self.tls.certificate)
                    put(f"transport/link/tls/{side}_private_key", self.tls.private_key)
            put("transport/link/tls/enable_mtls", self.tls.mutual)
        if self.user is not None:
            put("transport/auth/usrpwd/user", self.user)
            put("transport/auth/usrpwd/password", self._password())
        if self.users_file is not None:
            put("transport/auth/usrpwd/dictionary_file", self.users_file)
        if self.access is not None:
            config.insert_json5("access_control", self.access.to_json())

    def _password(self) -> str:
        """This host's password, read now (on the host that opens the session)."""
        if self.password_env is not None:
            password = os.environ.get(self.password_env)
            if not password:
                raise BridgeError(f"zenoh password_env: the environment variable {self.password_env} "
                                  "is not set (or empty) in this process")
            return password
        try:
            with open(self.password_file, encoding="utf-8") as f:
                password = f.read().strip("\r\n")
        except OSError as e:
            raise BridgeError(f"zenoh password_file: cannot read {self.password_file}: "
                              f"{e.strerror}") from None
        if not password:
            raise BridgeError(f"zenoh password_file: {self.password_file} is empty")
        return password


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
