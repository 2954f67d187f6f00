"""Who may use the dashboard: the Host and Origin checks and the control token.

A browser lets any web page open a WebSocket to localhost (no same-origin policy for
WebSockets) and a DNS-rebinding page can reach it under a name of its own: every request
must name an address the dashboard serves (Host), a browser's WebSocket must come from
the dashboard's own page (Origin), and changing anything needs the run's secret token.
The threat model: docs/security.md.
"""

import hmac
import ipaddress
import os
import secrets
import socket
from urllib.parse import parse_qs, urlsplit

TOKEN_ENV = "MQ_DASHBOARD_TOKEN"  # where a token comes from besides --token
MIN_TOKEN_CHARS = 16  # a given token shorter than this is refused (guessable)


class AccessError(ValueError):
    """The dashboard's access settings cannot be used as given (what to do is in the message)."""


def is_loopback(host: str) -> bool:
    """Does listening on ``host`` stay on this machine?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond this machine


def control_token(host: str, token: str | None, read_only: bool) -> str | None:
    """The token that grants control (None: nobody has control).  ``token`` None takes it
    from $MQ_DASHBOARD_TOKEN, else makes one, on loopback only: beyond it a token must be
    chosen (the URL printed on a terminal is not a way to hand it to the network)."""
    if read_only:
        return None
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if token is None:
        if not is_loopback(host):
            raise AccessError(
                f"listening on {host} (beyond this machine) needs a token, or anyone who reaches the port "
                f"could change the graph: set {TOKEN_ENV}=<a secret of 16+ characters> (or --token), or "
                f"add --read-only")
        return secrets.token_urlsafe(24)
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise AccessError(f"the dashboard token must be at least {MIN_TOKEN_CHARS} printable characters "
                          "without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison (the time taken says nothing of how much matched)."""
    if expected is None or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def request_token(path: str) -> str | None:
    """The ``token`` query parameter of a request path (``/ws?token=...``)."""
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


def allowed_hostnames(host: str) -> set[str]:
    """The names a request's Host may carry: this machine's own names and the listening
    address; any IP literal is allowed as well (see :func:`host_allowed`)."""
    names = {"localhost", host.lower()}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names


def host_allowed(header: str | None, port: int, names: set[str]) -> bool:
    """Is ``header`` (a request's Host) an address this dashboard serves?  An IP literal or
    one of ``names``, with the dashboard's port.  A DNS-rebinding page reaches the
    dashboard under the attacker's own name: refused."""
    if not header:
        return False
    try:
        parts = urlsplit(f"//{header}")
        hostname, given_port = parts.hostname, parts.port
    except ValueError:
        return False
    if hostname is None or (given_port or 80) != port:
        return False
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        return hostname.lower() in names


def origin_allowed(origin: str | None, host_header: str) -> bool:
    """A browser's WebSocket must come from a page of this dashboard: its Origin is the
    address the browser reached it at (the Host, checked before).  A client that is not a
    browser sends no Origin and is let through (the token still guards control)."""
    if origin is None:
        return True
    return origin.lower() == f"http://{host_header.lower()}"
