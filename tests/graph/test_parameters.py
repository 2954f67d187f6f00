"""Typed run-time parameters (issue 15, scenario 6): a value a block cannot take is refused
by `mq param`, Runtime.set_parameter, graph files, the dashboard and the worker itself,
with a clear error; the graph keeps running and the parameter keeps its value."""

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import websockets
from graph_blocks import typed_gain

from helpers import wait_until
from multiqueue.control.bus import Bus
from multiqueue.dashboard import Dashboard
from multiqueue.errors import GraphFileError
from multiqueue.graph import Block, NullSink, Param, Port, Runtime, SignalSource, attach, load_graph

MQ = [sys.executable, "-m", "multiqueue.cli"]

# The user's block of scenario 6, in a module next to the graph file: it declares
# nothing, so its parameter is typed by its default.
AMP = '''\
import numpy as np
from multiqueue.graph import block

@block(inputs={"in": np.float32}, outputs={"out": np.float32})
def amp(frames, gain=0.5):
    return [f * np.float32(gain) for f in frames]  # np.float32("loud") raises ValueError
'''
# A class-style block that declares a range and choices.
LEVEL = '''\
import numpy as np
from multiqueue.graph import Block, Param, Port

class Level(Block):
    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}
    parameters = {"limit": Param(float, min=0.0, max=1.0), "mode": Param(str, choices=("clip", "pass"))}

    def __init__(self, limit=0.5, mode="clip"):
        super().__init__()
        self.limit, self.mode = limit, mode

    def work(self, inputs):
        for frame in inputs["in"]:
            self.send("out", np.minimum(frame.array, np.float32(self.limit)))
'''

AMP_GRAPH = """\
blocks:
  src: {class: SignalSource, params: {rate: 640, frame: 64, realtime: true}}
  amp: {class: "mq_param_amp:amp", placement: dsp}
  sink: {class: NullSink, placement: dsp}
connections: [src.out -> amp.in, amp.out -> sink.in]
"""
LEVEL_GRAPH = """\
blocks:
  src: {class: SignalSource, params: {rate: 640, frame: 64, realtime: true}}
  amp: {class: "mq_param_amp:amp", placement: dsp}
  level: {class: "mq_param_level:Level", placement: dsp}
  sink: {class: NullSink, placement: dsp}
connections: [src.out -> amp.in, amp.out -> level.in, level.out -> sink.in]
"""


def mq(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=60)


def write_graph(tmp_path, graph: str):
    (tmp_path / "mq_param_amp.py").write_text(AMP)
    (tmp_path / "mq_param_level.py").write_text(LEVEL)
    path = tmp_path / "params.yaml"
    path.write_text(graph)
    return path


def sink_received(domain: str) -> int:
    with attach(domain, name="test-stats") as graph:
        return graph.stats().blocks["sink"].items_in


def keeps_running(domain: str) -> None:
    """The sink receives more frames from now on (the graph did not die)."""
    with attach(domain, name="test-stats") as graph:
        before = graph.stats().blocks["sink"].items_in
        wait_until(lambda: graph.stats().blocks["sink"].items_in >= before + 3,
                   "the sink receives more frames", timeout=30, interval=0.05)


@contextlib.contextmanager
def mq_run(domain: str, tmp_path, graph: str):
    """`mq run` of ``graph`` (10 frames/s) as a user starts it, once frames reach the sink;
    stopped with Ctrl-C afterwards, which must find that it ran to the end unharmed."""
    proc = subprocess.Popen([*MQ, "run", str(write_graph(tmp_path, graph)), "--domain", domain, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "running" in proc.stdout.readline()
        wait_until(lambda: proc.poll() is not None or _received_quietly(domain) > 0, "frames reach the sink",
                   interval=0.1)
        assert proc.poll() is None, proc.communicate()
        yield domain
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "(interrupted)" in out and "failed" not in out + err, out + err


def _received_quietly(domain: str) -> int:
    try:
        return sink_received(domain)
    except Exception:  # noqa: BLE001 - the graph is not up yet
        return 0


# -- scenario 6, as the user drove it -----------------------------------------------------------


def test_mq_param_refuses_a_wrongly_typed_value_and_the_graph_keeps_running(domain, tmp_path):
    with mq_run(domain, tmp_path, AMP_GRAPH):
        refused = mq("param", domain, "amp", "gain", '"loud"')
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.strip() == ("mq param: block 'amp' refused: TypeError: parameter 'gain' must "
                                          "be a number, not 'loud' (str)")
        assert refused.stdout == ""
        keeps_running(domain)
        got = mq("param", domain, "amp", "gain")
        assert got.returncode == 0 and got.stdout.strip() == "amp.gain = 0.5", got.stdout + got.stderr


def test_the_worker_refuses_a_bad_value_that_skipped_every_check(domain, tmp_path):
    """A process that sends the command itself (no description checked): the block's
    worker checks again, answers the error and keeps the value; a timed change too."""
    with mq_run(domain, tmp_path, AMP_GRAPH), attach(domain, name="test-raw") as graph, \
            Bus(graph.manager) as bus:
        for command in ({"cmd": "set", "name": "gain", "value": "loud"},
                        {"cmd": "set", "name": "gain", "value": "loud", "at_ns": 0}):
            answer = bus.request("ctl-amp", command, timeout=10).data
            assert answer == {"ok": False, "error": "TypeError: parameter 'gain' must be a number, "
                                                    "not 'loud' (str)"}
        keeps_running(domain)
        get = {"cmd": "get", "name": "gain"}
        assert bus.request("ctl-amp", get, timeout=10).data == {"ok": True, "value": 0.5}


def test_mq_param_refuses_a_value_out_of_range_or_not_a_choice(domain, tmp_path):
    with mq_run(domain, tmp_path, LEVEL_GRAPH):
        out_of_range = mq("param", domain, "level", "limit", "5", "--json")
        assert out_of_range.returncode == 1
        assert json.loads(out_of_range.stdout) == {
            "block": "level", "name": "limit", "ok": False,
            "error": "ValueError: parameter 'limit' must be a number from 0 to 1, not 5"}
        not_a_choice = mq("param", domain, "level", "mode", "loud")
        assert not_a_choice.returncode == 1
        assert "parameter 'mode' must be one of 'clip', 'pass', not 'loud'" in not_a_choice.stderr
        keeps_running(domain)
        assert mq("param", domain, "level", "limit").stdout.strip() == "level.limit = 0.5"
        accepted = mq("param", domain, "level", "limit", "1")  # an int for a float: taken as 1.0
        assert accepted.returncode == 0 and "set to 1.0 (acknowledged)" in accepted.stdout, accepted.stderr


def test_mq_param_lists_a_blocks_parameters_with_types_values_and_ranges(domain, tmp_path):
    with mq_run(domain, tmp_path, LEVEL_GRAPH):
        table = mq("param", domain, "level")
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines() == [
            f"level (Level): 2 run-time parameters; set one with: mq param {domain} level NAME VALUE",
            "  name   type   value   allowed",
            "  limit  float  0.5     a number from 0 to 1",
            "  mode   str    \"clip\"  one of 'clip', 'pass'",
        ]
        listed = json.loads(mq("param", domain, "amp", "--json").stdout)
        assert listed["ok"] and listed["parameters"] == {"gain": {
            "type": "float", "min": None, "max": None, "choices": None, "positive": False, "none": False,
            "allowed": "a number", "value": 0.5}}
        none = mq("param", domain, "sink")
        assert none.returncode == 0 and none.stdout.strip() == "sink (NullSink) has no run-time parameters"


# -- graph files, Runtime, @block --------------------------------------------------------------


def test_a_graph_file_with_a_wrongly_typed_param_fails_at_its_line(domain, tmp_path):
    wrong_type = AMP_GRAPH.replace('amp: {class: "mq_param_amp:amp", placement: dsp}',
                                   'amp:\n    class: "mq_param_amp:amp"\n    params:\n      gain: loud')
    with pytest.raises(GraphFileError) as info:
        load_graph(write_graph(tmp_path, wrong_type))
    assert (info.value.line, info.value.key) == (6, "blocks.amp.params.gain")
    assert info.value.reason == "parameter 'gain' must be a number, not 'loud' (str)"

    out_of_range = LEVEL_GRAPH.replace('level: {class: "mq_param_level:Level", placement: dsp}',
                                       'level: {class: "mq_param_level:Level", params: {limit: 3}}')
    path = write_graph(tmp_path, out_of_range)
    result = subprocess.run([*MQ, "run", str(path), "--domain", domain], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"{path}:4: blocks.level.params.limit: parameter 'limit' must be a "
                                     "number from 0 to 1, not 3"), result.stderr


def test_runtime_set_parameter_refuses_before_the_worker(domain):
    rt = Runtime(domain)
    src = rt.add(SignalSource(rate=640, frame=64, realtime=True), name="src")
    amp = rt.add(typed_gain(), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink", placement="thread")["in"])
    with rt:
        rt.start()
        with pytest.raises(TypeError, match=r"^parameter 'gain' must be a number from 0 to 10, not 'loud'"):
            rt.set_parameter("amp", "gain", "loud")
        with pytest.raises(ValueError, match=r"^parameter 'gain' must be a number from 0 to 10, not 11$"):
            rt.set_parameter("amp", "gain", 11, at_ns=0)
        rt.set_parameter("amp", "gain", 2)
        assert rt.get_parameter("amp", "gain") == 2.0
        assert rt.stats().blocks["amp"].state == "running"
    assert rt.blocks_in_use_at_end == 0


def test_block_function_parameters_are_typed_from_annotations_and_defaults():
    specs = typed_gain().parameter_specs()
    assert specs == {"gain": Param(float, min=0, max=10), "label": Param(str), "taps": Param(int),
                     "on": Param(bool), "limit": Param(int, none=True)}
    for params, error in (({"gain": "loud"}, "parameter 'gain' must be a number from 0 to 10, not 'loud' "
                                             "(str)"),
                          ({"taps": 2.5}, "parameter 'taps' must be an int, not 2.5 (float)"),
                          ({"on": 1}, "parameter 'on' must be true or false, not 1 (int)"),
                          ({"limit": "3"}, "parameter 'limit' must be None or an int, not '3' (str)")):
        with pytest.raises(TypeError) as info:
            typed_gain(**params)  # where the block is made, not in its worker
        assert str(info.value) == error
    b = typed_gain(gain=3, limit=2)
    assert b.params["gain"] == 3.0 and isinstance(b.params["gain"], float) and b.params["limit"] == 2
    with pytest.raises(ValueError, match="must be a number from 0 to 10, not -1"):
        b.set_parameter("gain", -1)
    assert b.get_parameter("gain") == 3.0  # a refused value changes nothing


def test_class_style_blocks_declare_params_or_are_typed_by_annotation_and_value():
    class Named(Block):
        outputs = {"out": Port(np.float32)}
        parameters = ("rate", "name", "anything")

        def __init__(self, rate: float = 10, name="a", anything=None):
            super().__init__()
            self.rate, self.name, self.anything = rate, name, anything

    named = Named()
    assert named.parameter_specs() == {"rate": Param(float), "name": Param(str), "anything": Param()}
    named.set_parameter("rate", 2)  # an int for an annotated float
    assert named.rate == 2.0 and isinstance(named.rate, float)
    with pytest.raises(TypeError, match="parameter 'name' must be a string, not 3"):
        named.set_parameter("name", 3)
    named.set_parameter("anything", [1, "x"])  # no annotation, no value: any value

    class Wrong(Named):
        parameters = {"rate": "fast"}

    with pytest.raises(TypeError, match=r"block 'w': parameter 'rate' is declared as 'fast'"):
        Runtime("declared").add(Wrong(), name="w")


def test_param_declarations_check_themselves_and_travel_as_data():
    for declared in (Param(float, min=-1.5, max=2), Param(int, min=1), Param(str, choices=("a", "b")),
                     Param(float, positive=True, none=True), Param(bool), Param(list), Param()):
        assert Param.from_description(json.loads(json.dumps(declared.describe()))) == declared
    with pytest.raises(TypeError, match="Param type must be one of"):
        Param(complex)
    with pytest.raises(ValueError, match="min 2 is above max 1"):
        Param(int, min=2, max=1)
    with pytest.raises(TypeError, match="min is a finite number, for a float or int parameter"):
        Param(str, min=0)
    with pytest.raises(TypeError, match=r"Param choices must be of its type \(int\), not 'two'"):
        Param(int, choices=(1, "two"))
    with pytest.raises(ValueError, match="parameter 'x' must be a finite number, not inf"):
        Param(float).check("x", float("inf"))
    assert Param(float).check("x", np.float32(0.25)) == 0.25 and Param(int).check("x", np.int64(3)) == 3


# -- the dashboard ------------------------------------------------------------------------------


@pytest.fixture
def dashboard(domain):
    """A graph whose ``amp`` has typed parameters (gain 2.0, 0 to 10), and its dashboard
    (frames above its MAX_POINTS: smaller ones end the page's session, a bug of its own)."""
    rt = Runtime(domain)
    src = rt.add(SignalSource(rate=20480, frame=2048, realtime=True), name="src")
    amp = rt.add(typed_gain(gain=2), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink", placement="thread")["in"])
    with rt:
        rt.start()
        dash = Dashboard(domain, port=0).start()
        try:
            yield rt, dash
        finally:
            dash.stop()
    assert rt.blocks_in_use_at_end == 0


def test_the_dashboard_lists_parameters_and_refuses_a_bad_value_before_sending(dashboard):
    rt, dash = dashboard
    first, listed, refused = asyncio.run(asyncio.wait_for(_dashboard_session(dash.ws_url), 60))
    assert rt.get_parameter("amp", "gain") == 2.0  # unchanged
    assert rt.stats().blocks["amp"].state == "running"
    declared = next(b for b in first["graph"]["blocks"] if b["name"] == "amp")["parameters"]
    assert declared["gain"]["allowed"] == "a number from 0 to 10"  # the page validates with this
    assert listed["ok"] and listed["parameters"]["gain"]["value"] == 2.0
    assert listed["parameters"]["label"] == {**Param(str).describe(), "value": "x"}
    assert refused == {"type": "ack", "ok": False, "block": "amp", "name": "gain",
                       "error": "ValueError: parameter 'gain' must be a number from 0 to 10, not 99"}


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="no browser: install Debian's chromium and chromium-driver (.ci/run does)")
def test_the_dashboard_page_lists_types_and_checks_a_value_before_sending_it(dashboard):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    rt, dash = dashboard
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(dash.url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.execute_script("return window.mq.params && window.mq.params.block"))
        Select(driver.find_element(By.ID, "pblock")).select_by_visible_text("amp")
        wait.until(lambda d: d.execute_script("return window.mq.params.block") == "amp")
        rows = driver.find_element(By.ID, "params").text.splitlines()
        assert {"gain float 2 a number from 0 to 10", "limit int null None or an int"} <= set(rows), rows
        driver.find_element(By.ID, "pname").send_keys("gain")
        driver.find_element(By.ID, "pvalue").send_keys("loud")
        driver.find_element(By.ID, "pset").click()
        ack = driver.execute_script("return window.mq.lastAck")
        assert ack["local"] and ack["error"] == "parameter 'gain' must be a number from 0 to 10, not \"loud\""
        assert "must be a number from 0 to 10" in driver.find_element(By.ID, "ack").text
        driver.find_element(By.ID, "pvalue").clear()
        driver.find_element(By.ID, "pvalue").send_keys("3")
        driver.find_element(By.ID, "pset").click()
        wait.until(lambda d: "gain float 3 a number from 0 to 10" in d.find_element(By.ID, "params").text)
    finally:
        driver.quit()
    assert rt.get_parameter("amp", "gain") == 3.0


async def _dashboard_session(url: str):
    async with websockets.connect(url) as ws:
        first = await _next(ws, "graph")
        await ws.send(json.dumps({"type": "params", "block": "amp"}))
        listed = await _next(ws, "params")
        await ws.send(json.dumps({"type": "set", "block": "amp", "name": "gain", "value": 99}))
        refused = await _next(ws, "ack")
    return first, listed, refused


async def _next(ws, kind: str) -> dict:
    while (m := json.loads(await ws.recv()))["type"] != kind:
        pass
    return m


def test_the_spectrum_demos_parameters_are_declared_so_mq_param_refuses_a_rate_of_zero(domain, tmp_path):
    """`mq param DOMAIN source rate_hz 0` used to be acknowledged, then the demo's source
    died dividing by zero in its worker."""
    from multiqueue.demos.spectrum import build  # noqa: PLC0415 - only this test runs the demo

    rt, _probe = build(domain, str(tmp_path / "rec.npy"), 60, bins=1024)
    with rt:
        rt.start()
        zero = mq("param", domain, "source", "rate_hz", "0")
        assert zero.returncode == 1 and "parameter 'rate_hz' must be a number > 0" in zero.stderr, zero.stderr
        negative = mq("param", domain, "detector", "threshold_db", "-3")
        assert negative.returncode == 1 and "parameter 'threshold_db' must be" in negative.stderr
        assert rt.get_parameter("source", "rate_hz") > 0
        assert rt.stats().blocks["source"].state == "running"
