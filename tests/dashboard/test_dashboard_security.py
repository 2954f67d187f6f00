"""Nobody gets in where they don't belong (issue 20, the dashboard): a foreign web page
(Origin), a DNS-rebinding name (Host), a page without the run's token, the network
without a token, --read-only.  Driven as a user and an attacker would: `mq dashboard`
in its own process, raw WebSocket and HTTP clients, `mq param` to see what changed."""

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from helpers import Lines, spawn_python
from multiqueue.control.log import log_path
from multiqueue.graph import Amplifier, NullSink, Runtime, SignalSource
from multiqueue.shm import PoolConfig, ShmConfig

MQ = [sys.executable, "-m", "multiqueue.cli"]
SET_GAIN = {"type": "set", "block": "amp", "name": "gain", "value": 7.0}
ENV_TOKEN = "a-test-token-of-32-characters-xy"


@pytest.fixture
def graph(domain):
    """src -> amp (gain 2) -> sink, running (threads of this process)."""
    rt = Runtime(domain, pools=ShmConfig(pools=[PoolConfig("frames", 4096, 64)], max_processes=16))
    source = SignalSource(rate=2560, frame=256, count=10**9, realtime=True)  # 10 frames a second
    src = rt.add(source, name="src", placement="thread")
    amp = rt.add(Amplifier(2.0), name="amp", placement="thread")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink", placement="thread")["in"])
    with rt:
        rt.start()
        yield rt


class DashboardCommand:
    """`mq dashboard DOMAIN --port 0 ...` in its own process: its URL (with the token)."""

    def __init__(self, domain: str, *options, env=None):
        self.proc = subprocess.Popen([*MQ, "dashboard", domain, "--port", "0", *options], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = Lines(self.proc.stdout)
        self.line = self.out.wait_for("dashboard of domain")
        self.url = re.search(r"(http://\S+)", self.line).group(1)
        self.port = int(re.search(r":(\d+)/", self.url).group(1))
        self.token = (re.search(r"token=(\S+)", self.url) or [None, None])[1]

    def ws(self, token: str | None = None, **headers):
        query = f"?token={token}" if token else ""
        return connect(f"ws://127.0.0.1:{self.port}/ws{query}", open_timeout=30, additional_headers=headers)

    def stop(self) -> str:
        """Stop it as SIGTERM does; its stderr."""
        self.proc.terminate()
        assert self.proc.wait(timeout=30) == 0
        with self.proc.stderr:
            return self.proc.stderr.read()


def messages_until(ws, kind: str, limit: int = 500) -> list[dict]:
    """The messages up to the first of ``kind`` (included)."""
    seen = []
    while len(seen) < limit:
        seen.append(json.loads(ws.recv(timeout=30)))
        if seen[-1]["type"] == kind:
            return seen
    raise AssertionError(f"no {kind!r} message in {limit}")


def gain(domain: str) -> str:
    got = subprocess.run([*MQ, "param", domain, "amp", "gain"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def test_a_foreign_web_page_cannot_open_the_websocket_and_nothing_changes(graph):
    """The reproduction: a client saying `Origin: http://evil.example` connected and set the
    gain to 7.0 (cross-site WebSocket hijacking).  Now: 403 at the handshake."""
    dashboard = DashboardCommand(graph.domain)
    try:
        with pytest.raises(InvalidStatus) as refused:
            with dashboard.ws(dashboard.token, Origin="http://evil.example") as ws:
                ws.send(json.dumps(SET_GAIN))
        assert refused.value.response.status_code == 403
        assert gain(graph.domain) == "amp.gain = 2.0"
    finally:
        err = dashboard.stop()
    assert "refused a WebSocket from origin 'http://evil.example'" in err


@pytest.mark.parametrize("host", ["evil.example:{port}", "rebind.attacker.test:{port}", "127.0.0.1:1"])
def test_a_request_for_a_host_name_not_served_is_refused(graph, host):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1; the browser then sends
    that name as Host (and as the page's own origin)."""
    dashboard = DashboardCommand(graph.domain)
    try:
        header = host.format(port=dashboard.port)
        connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=30)
        connection.request("GET", "/", headers={"Host": header})  # the page, as the rebound browser asks
        assert connection.getresponse().status == 403
        connection.close()
        handshake = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=30)  # its WebSocket
        handshake.request("GET", f"/ws?token={dashboard.token}", headers={
            "Host": header, "Origin": f"http://{header}", "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert handshake.getresponse().status == 403
        handshake.close()
        page = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=30)  # its own address: served
        page.request("GET", "/")
        response = page.getresponse()
        assert response.status == 200 and response.getheader("Referrer-Policy") == "no-referrer"
    finally:
        dashboard.stop()


def test_without_the_token_a_page_watches_but_cannot_change_anything_with_it_it_can(graph):
    dashboard = DashboardCommand(graph.domain)
    origin = {"Origin": f"http://127.0.0.1:{dashboard.port}"}  # the dashboard's own page
    try:
        assert dashboard.token and len(dashboard.token) >= 16
        with dashboard.ws(None, **origin) as ws:
            hello = json.loads(ws.recv(timeout=30))
            assert hello["type"] == "session" and hello["control"] is False
            assert "no control token" in hello["why"] and "?token=" in hello["why"]
            messages_until(ws, "stats")  # it watches
            ws.send(json.dumps(SET_GAIN))
            ack = messages_until(ws, "ack")[-1]
            assert ack["ok"] is False and "PermissionError" in ack["error"], ack
            assert "can only watch" in ack["error"]
        wrong = dashboard.token[:-1] + ("x" if dashboard.token[-1] != "x" else "y")
        with dashboard.ws(wrong, **origin) as ws:
            assert json.loads(ws.recv(timeout=30))["control"] is False  # a wrong token is no token
        assert gain(graph.domain) == "amp.gain = 2.0"
        with dashboard.ws(dashboard.token, **origin) as ws:
            assert json.loads(ws.recv(timeout=30))["control"] is True
            ws.send(json.dumps(SET_GAIN))
            ack = messages_until(ws, "ack")[-1]
            assert ack["ok"] is True, ack
        assert gain(graph.domain) == "amp.gain = 7.0"
    finally:
        err = dashboard.stop()
    with open(log_path(graph.domain)) as log:  # a secret is never logged
        assert dashboard.token not in log.read() + err


def test_read_only_refuses_every_change_whoever_asks(graph):
    dashboard = DashboardCommand(graph.domain, "--read-only")
    try:
        assert dashboard.token is None and "(read-only;" in dashboard.line
        with dashboard.ws("anything-at-all-16chars") as ws:
            hello = json.loads(ws.recv(timeout=30))
            assert hello["control"] is False and "--read-only" in hello["why"]
            ws.send(json.dumps(SET_GAIN))
            assert messages_until(ws, "ack")[-1]["ok"] is False
        assert gain(graph.domain) == "amp.gain = 2.0"
    finally:
        dashboard.stop()


def test_listening_beyond_loopback_needs_a_token_and_says_how(domain):
    no_token = {k: v for k, v in os.environ.items() if k != "MQ_DASHBOARD_TOKEN"}
    refused = subprocess.run([*MQ, "dashboard", domain, "--host", "0.0.0.0", "--port", "0"], env=no_token,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "needs a token" in refused.stderr and "MQ_DASHBOARD_TOKEN" in refused.stderr, refused.stderr
    short = subprocess.run([*MQ, "dashboard", domain, "--host", "0.0.0.0", "--port", "0", "--token", "short"],
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 16" in short.stderr, short.stderr


def test_a_token_from_the_environment_opens_the_network_door_to_its_holder_only(graph):
    env = {**os.environ, "MQ_DASHBOARD_TOKEN": ENV_TOKEN}
    dashboard = DashboardCommand(graph.domain, "--host", "0.0.0.0", env=env)
    try:
        assert dashboard.token == ENV_TOKEN
        with dashboard.ws(None) as ws:
            assert json.loads(ws.recv(timeout=30))["control"] is False
        with dashboard.ws(ENV_TOKEN) as ws:
            assert json.loads(ws.recv(timeout=30))["control"] is True
    finally:
        dashboard.stop()


OUTSIDE_READER = """
import sys
from multiqueue.graph import attach
with attach(sys.argv[1], name=sys.argv[2]) as graph, graph.subscribe("src.out"):
    print("reading", flush=True)
    sys.stdin.read()  # until the test closes it
"""


@contextlib.contextmanager
def outside_reader(domain: str, name: str):
    """Another process reading src.out under ``name`` (it shows as an edge to that name)."""
    reader = spawn_python(OUTSIDE_READER, domain, name)
    try:
        assert reader.stdout.readline() == "reading\n", reader.stderr.read()
        yield
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="no browser: install Debian's chromium and chromium-driver (.ci/run does)")
def test_the_page_without_the_token_watches_only_and_names_from_other_processes_stay_text(graph):
    """In a real browser: the page opened without the token says it watches only and its
    editor sends nothing; an outside reader that names itself with markup (it shows in the
    edge table) is shown as text, never run as part of the page (which holds the token)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    marked_up = "<img src=x onerror=pwned=1>"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    dashboard = DashboardCommand(graph.domain)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        with outside_reader(graph.domain, marked_up):
            driver.get(f"http://127.0.0.1:{dashboard.port}/")  # no token
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.execute_script("return window.mq.session !== null"))
            assert driver.execute_script("return window.mq.session.control") is False
            assert not driver.find_element(By.ID, "pset").is_enabled()
            assert "can only watch" in driver.find_element(By.ID, "ack").text
            wait.until(lambda d: marked_up in d.find_element(By.ID, "edges").text)  # shown as text
            assert driver.execute_script("return typeof window.pwned") == "undefined"
        driver.get(dashboard.url)  # with the token: the editor is on
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.mq.session !== null"))
        assert driver.execute_script("return window.mq.session.control") is True
        assert driver.find_element(By.ID, "pset").is_enabled()
    finally:
        driver.quit()
        dashboard.stop()
