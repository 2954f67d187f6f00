"""Secure remote control and bridges over Zenoh: TLS, user/password logins and access
rules set from a graph file's ``zenoh:`` settings, control refused unless the graph
enables it, and every control request logged with who sent it.

The two-host tests run ``mq run --host`` processes over 127.0.0.1 with certificates made
by the ``openssl`` CLI in tmp_path.  What must not arrive is checked against what does:
a peer without credentials listens while the credentialed receiver counts more frames.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import wait_until
from multiqueue.control.log import read_lines
from multiqueue.errors import BridgeError, GraphFileError
from multiqueue.graph import load_graph_text
from multiqueue.net.control import RemoteGraph
from multiqueue.net.settings import ZenohSettings, close_session, open_session

pytest.importorskip("zenoh")
TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
USERS = ("a", "b", "ops", "viewer")
WAIT = 60.0


# -- certificates and logins, made in the test --------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def pki(tmp_path) -> Path:
    """A CA, a certificate for hosts a and b (valid for 127.0.0.1), a password file per
    user (read by its owner only) and the users file (Zenoh's user:password lines)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=mq-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    for host in ("a", "b"):
        (d / f"{host}.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                                       "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("req", *ec, "-keyout", f"{host}.key", "-out", f"{host}.csr", "-subj", f"/CN={host}", cwd=d)
        openssl("x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{host}.pem", "-days", "2", "-extfile", f"{host}.ext", cwd=d)
    passwords = {user: uuid.uuid4().hex for user in USERS}
    for user, password in passwords.items():
        (d / f"{user}.pw").write_text(password + "\n")
        os.chmod(d / f"{user}.pw", 0o600)
    (d / "users.txt").write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
    os.chmod(d / "users.txt", 0o600)
    return d


def login(pki: Path, user: str | None, endpoint: str, **extra) -> dict:
    """A remote peer's settings: TLS with our CA, and a login unless ``user`` is None."""
    settings = {"connect": [endpoint], "tls": {"ca": str(pki / "ca.pem")}, **extra}
    if user is not None:
        settings.update(user=user, password_file=str(pki / f"{user}.pw"))
    return settings


# -- settings: checked, and mapped onto Zenoh's keys -------------------------------------------


def test_security_settings_map_onto_zenohs_keys(pki, monkeypatch):
    monkeypatch.setenv("MQ_TEST_PASSWORD", "s3cret")
    settings = ZenohSettings.of({
        "listen": ["tls/127.0.0.1:7447"],
        "tls": {"ca": pki / "ca.pem", "certificate": pki / "a.pem", "private_key": pki / "a.key",
                "mutual": True},
        "user": "a", "password_env": "MQ_TEST_PASSWORD", "users_file": pki / "users.txt",
        "access": {"rules": [{"users": ["b"], "keys": ["mq/g/data/**"], "messages": ["put"]},
                             {"cert_names": ["b"], "keys": "mq/g/**", "permission": "deny"}]}})
    assert "s3cret" not in repr(settings)
    config = settings.to_config()
    get = lambda key: json.loads(config.get_json(key))  # noqa: E731
    assert get("transport/link/protocols") == ["tls"]
    assert get("transport/link/tls/listen_certificate") == str(pki / "a.pem")
    assert get("transport/link/tls/connect_private_key") == str(pki / "a.key")
    assert get("transport/link/tls/enable_mtls") is True
    assert get("transport/auth/usrpwd/user") == "a" and get("transport/auth/usrpwd/password") == "s3cret"
    assert get("transport/auth/usrpwd/dictionary_file") == str(pki / "users.txt")
    acl = get("access_control")
    assert acl["enabled"] and acl["default_permission"] == "deny"
    subjects = [{k: v for k, v in s.items() if v is not None} for s in acl["subjects"]]
    assert subjects == [{"id": "s0", "usernames": ["b"]}, {"id": "s1", "cert_common_names": ["b"]}]
    assert acl["rules"][0]["messages"] == ["put"] and acl["rules"][1]["permission"] == "deny"
    assert acl["policies"][1] == {"id": "p1", "rules": ["r1"], "subjects": ["s1"]}
    # a host with a CA only (no certificate) cannot accept TLS: it listens nowhere
    assert json.loads(ZenohSettings(connect=["tls/h:1"], tls={"ca": "ca.pem"}).to_config()
                      .get_json("listen/endpoints")) == []


BAD_SETTINGS = {
    "a password in clear": ({"user": "a", "password": "x"}, "never write a password"),
    "user without password": ({"user": "a"}, "exactly one of password_file or password_env"),
    "two passwords": ({"user": "a", "password_file": "p", "password_env": "P"}, "exactly one of"),
    "plain endpoint with tls": ({"tls": {"ca": "c"}, "listen": ["tcp/0.0.0.0:1"]}, "every endpoint is tls/"),
    "certificate without key": ({"tls": {"ca": "c", "certificate": "x"}}, "certificate and private_key"),
    "unknown tls key": ({"tls": {"ca": "c", "cert": "x"}}, "zenoh tls: unknown key(s) cert"),
    "unknown message": ({"access": {"rules": [{"keys": ["a"], "messages": ["pub"]}]}},
                        "access.rules[0].messages: ['pub'] is not one of put"),
    "rule without keys": ({"access": {"rules": [{"interfaces": ["lo"]}]}}, "access.rules[0].keys: name at"),
    "tls without ca": ({"tls": {}}, "zenoh tls.ca: give the certificate"),
    "users without users_file": ({"access": {"rules": [{"keys": ["a"], "users": ["x"]}]}}, "need users_file"),
    "bad default": ({"access": {"default": "maybe"}}, "access.default must be allow or deny"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_security_settings_name_the_field(case):
    value, message = BAD_SETTINGS[case]
    with pytest.raises((TypeError, ValueError)) as info:
        ZenohSettings.of(value)
    assert message in str(info.value)


def test_a_missing_password_is_an_error_on_the_host_that_opens_the_session(monkeypatch):
    monkeypatch.delenv("MQ_TEST_NO_SUCH", raising=False)
    settings = ZenohSettings(user="a", password_env="MQ_TEST_NO_SUCH")  # fine to hold elsewhere
    with pytest.raises(BridgeError, match="MQ_TEST_NO_SUCH is not set"):
        open_session(settings)


def test_remote_control_in_a_graph_file_is_a_boolean_off_by_default():
    graph = "blocks:\n  src: {class: NullSource}\n"
    assert load_graph_text(graph).remote_control is False
    assert load_graph_text("remote_control: true\n" + graph).remote_control is True
    with pytest.raises(GraphFileError, match="remote_control: expected true or false"):
        load_graph_text("remote_control: 1\n" + graph)


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mq(*args, env=None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "multiqueue.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def mq_remote(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiqueue.cli", "remote", *map(str, args)],
                          capture_output=True, text=True, timeout=WAIT)


def finish(procs) -> list:
    """Wait for the hosts to end (kill what does not) and return their output."""
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=WAIT))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
    return outs


def host_stats(remote: RemoteGraph, hosts: set, procs) -> dict:
    def up():
        for p in procs:
            assert p.poll() is None, p.communicate()
        stats = remote.stats()
        return stats if set(stats) >= hosts else None
    return wait_until(up, f"hosts {sorted(hosts)} answer", timeout=WAIT, interval=0.2)


def counter(remote: RemoteGraph, host: str, block: str, name: str) -> int:
    return remote.stats().get(host, {}).get("blocks", {}).get(block, {}).get("counters", {}).get(name, 0)


def secure_graph(graph: str, pki: Path, port: int, record: Path) -> str:
    data = f"mq/{graph}/data"
    return f"""
domain: {graph}
remote_control: true
hosts:
  a:
    zenoh:
      listen: ["tls/127.0.0.1:{port}"]
      tls: {{ca: "{pki}/ca.pem", certificate: "{pki}/a.pem", private_key: "{pki}/a.key"}}
      user: a
      password_file: "{pki}/a.pw"
      users_file: "{pki}/users.txt"
      access: &access
        rules:
          # the bridge, hosts only: a host that dialled us by its login, one we dialled by its certificate
          - {{users: [a, b], keys: ["{data}/**", "{data}/**/@mq/**"]}}
          - {{cert_names: [a, b], keys: ["{data}/**", "{data}/**/@mq/**"]}}
          - {{users: [ops], keys: ["mq/{graph}/**"]}}                     # control
          - {{users: [viewer], keys: ["mq/{graph}/host/*/stats", "mq/{graph}/host/*/status"]}}
  b:
    zenoh:
      connect: ["tls/127.0.0.1:{port}"]
      listen: ["tls/127.0.0.1:0"]
      tls: {{ca: "{pki}/ca.pem", certificate: "{pki}/b.pem", private_key: "{pki}/b.key"}}
      user: b
      password_env: MQ_TEST_PASSWORD_B
      users_file: "{pki}/users.txt"
      access: *access
blocks:
  src: {{class: "graph_blocks:Ramp", params: {{count: 1000000, n: 64, pace_s: 0.002}}, host: a}}
  amp: {{class: Amplifier, params: {{gain: 1.0}}, host: b}}
  rec: {{class: "graph_blocks:Record", params: {{path: "{record}"}}, host: b}}
connections:
  - {{from: src.out, to: amp.in, remote: true}}
  - amp.out -> rec.in
"""


def test_two_hosts_over_tls_with_logins_and_access_rules(graph_name, pki, tmp_path):
    port, record = free_port(), tmp_path / "rec.npy"
    path = tmp_path / "secure.yaml"
    path.write_text(secure_graph(graph_name, pki, port, record))
    endpoint, key = f"tls/127.0.0.1:{port}", f"mq/{graph_name}/data/src/out/amp/in"
    password_b = (pki / "b.pw").read_text().strip()
    procs = [mq("run", path, "--host", "b", "--quiet", env={"MQ_TEST_PASSWORD_B": password_b}),
             mq("run", path, "--host", "a", "--quiet")]
    try:
        with RemoteGraph(f"mq/{graph_name}", zenoh=login(pki, "ops", endpoint)) as ops:
            host_stats(ops, {"a", "b"}, procs)
            wait_until(lambda: counter(ops, "b", "rx0", "received") > 0, "frames cross over TLS",
                       timeout=WAIT)
            check_a_peer_without_credentials(ops, pki, endpoint, key, graph_name)
            check_a_viewer_cannot_control(ops, pki, endpoint, graph_name)
            ops.set_parameter("amp", "gain", 2.0)  # ops may
            assert ops.get_parameter("amp", "gain") == 2.0
            ops_zid = ops.zid
        stop = mq_remote(graph_name, "stop", "--connect", endpoint, "--tls-ca", pki / "ca.pem",
                         "--user", "ops", "--password-file", pki / "ops.pw")
        assert stop.returncode == 0, stop.stderr
        assert "a: stopping" in stop.stdout and "b: stopping" in stop.stdout
        outs = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = np.load(record)
    index = rows[:, 3] - 1_000_000  # Ramp stamps frame k with 1e6 + k
    assert index.tolist() == list(range(len(rows)))  # in order, nothing lost, nothing foreign
    assert set(rows[:, 0] / index.clip(1)) - {0.0} <= {1.0, 2.0}  # the gain ops set, no other
    log = "\n".join(read_lines(f"{graph_name}-b"))
    assert f"remote control from zid={ops_zid} cert=- user=ops: block amp " in log
    assert '"cmd": "set", "name": "gain", "value": 2.0' in log and "set" in log
    assert "user=ops: host b " in "\n".join(read_lines(f"{graph_name}-b"))  # the stop, too


def check_a_peer_without_credentials(ops, pki, endpoint, key, graph):
    """TLS without a login: no session with the hosts, so nothing received, nothing
    published, no stop, while the credentialed receiver counts on."""
    settings = ZenohSettings.of(login(pki, None, endpoint))
    session = open_session(settings)
    got = []
    try:
        subscriber = session.declare_subscriber(key, lambda sample: got.append(sample.payload.to_bytes()))
        before = counter(ops, "b", "rx0", "received")
        for _ in range(20):
            session.put(key, b"not a frame")
        stop = json.dumps({"cmd": "stop"})
        replies = list(session.get(f"mq/{graph}/host/*/ctl", payload=stop, timeout=1.0))
        wait_until(lambda: counter(ops, "b", "rx0", "received") > before + 100,
                   "the credentialed receiver counts 100 more frames", timeout=WAIT, interval=0.1)
        assert session.info.peers_zid() == [] and replies == []
        assert set(got) == {b"not a frame"}  # its own puts (delivered locally), no frame of the hosts
        subscriber.undeclare()
    finally:
        close_session(session)
    counters = ops.stats()["b"]["blocks"]["rx0"]["counters"]
    assert counters["invalid"] == 0 and counters["lost"] == 0, counters


def check_a_viewer_cannot_control(ops, pki, endpoint, graph):
    """A login the access rules let read stats, not control."""
    with RemoteGraph(f"mq/{graph}", zenoh=login(pki, "viewer", endpoint), timeout=2.0) as viewer:
        assert set(viewer.stats()) == {"a", "b"}  # allowed: stats
        assert viewer.graph_command("stop") == {}  # dropped by the hosts' access rules
        with pytest.raises(BridgeError, match="no host answered for block 'amp'"):
            viewer.set_parameter("amp", "gain", 9.0)
    cli = mq_remote(graph, "param", "amp", "gain", "9", "--connect", endpoint, "--tls-ca", pki / "ca.pem",
                    "--user", "viewer", "--password-file", pki / "viewer.pw", "--timeout", "2")
    assert cli.returncode == 1 and "access rules do not let user 'viewer'" in cli.stderr, cli.stderr
    assert ops.get_parameter("amp", "gain") == 1.0  # nothing changed
    nobody = mq_remote(graph, "stats", "--connect", endpoint, "--tls-ca", pki / "ca.pem", "--timeout", "1")
    assert nobody.returncode == 1 and "refused our TLS certificate or login" in nobody.stderr, nobody.stderr


def test_control_is_refused_unless_the_graph_enables_it(graph_name, tmp_path):
    port = free_port()
    path = tmp_path / "plain.yaml"
    path.write_text(f"""
domain: {graph_name}
hosts:
  a: {{zenoh: {{listen: ["tcp/127.0.0.1:{port}"]}}}}
blocks:
  src: {{class: "graph_blocks:Ramp", params: {{count: 1000000, n: 64, pace_s: 0.002}}}}
  amp: {{class: Amplifier, params: {{gain: 1.0}}}}
  sink: {{class: NullSink}}
connections: [src.out -> amp.in, amp.out -> sink.in]
""")
    procs = [mq("run", path, "--host", "a", "--quiet")]
    endpoint = f"tcp/127.0.0.1:{port}"
    try:
        with RemoteGraph(f"mq/{graph_name}", zenoh={"connect": [endpoint]}) as remote:
            host_stats(remote, {"a"}, procs)  # stats stay readable
            assert remote.get_parameter("amp", "gain") == 1.0  # and so do parameters
            with pytest.raises(BridgeError, match="remote control is off on host 'a'"):
                remote.set_parameter("amp", "gain", 2.0)
        stop = mq_remote(graph_name, "stop", "--connect", endpoint)
        assert stop.returncode == 1, stop.stdout
        assert stop.stderr.count("\n") == 1 and "stop refused: remote control is off" in stop.stderr
        assert procs[0].poll() is None  # still running
        procs[0].send_signal(signal.SIGINT)
        outs = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 0, outs
    refused = [line for line in read_lines(f"{graph_name}-a") if "remote control from" in line]
    assert any("block amp" in line and "remote control is off" in line for line in refused), refused
    assert any("host a" in line and '"stop"' in line for line in refused), refused
