"""The web dashboard: its server over a WebSocket, and the page in a real headless browser."""

import asyncio
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets

from multiqueue.dashboard import Dashboard, downsample
from multiqueue.demos.spectrum import build

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def demo(domain, tmp_path):
    """The spectrum demo (20,000 bins) running, and its dashboard on a free port."""
    rt, _probe = build(domain, str(tmp_path / "rec.npy"), 2, bins=20_000)
    rt.start()
    dash = Dashboard(domain, port=0).start()
    try:
        yield rt, dash
    finally:
        dash.stop()
        rt.stop()
    assert rt.blocks_in_use_at_end == 0


def test_downsample_keeps_peaks_and_short_frames():
    x = np.zeros(10_000, np.float32)
    x[5_000] = 7.0
    d = downsample(x, 100)
    assert d.shape == (100,) and d.max() == 7.0 and int(np.argmax(d)) == 50
    np.testing.assert_array_equal(downsample(np.arange(5, dtype=np.float32)), np.arange(5))


def test_server_sends_graph_stats_frames_and_applies_parameters(demo):
    rt, dash = demo

    async def session():
        seen = {"graph": 0, "stats": 0, "frame": 0}
        async with websockets.connect(dash.ws_url) as ws:  # with the token: this client may change things
            hello = json.loads(await ws.recv())
            assert hello == {"type": "session", "control": True, "read_only": False, "why": None}
            first = json.loads(await ws.recv())
            assert first["type"] == "graph" and "source.out" in first["ports"]
            await ws.send(json.dumps({"type": "watch", "port": "source.out"}))
            while seen["stats"] < 5 or seen["frame"] < 3:
                m = json.loads(await ws.recv())
                seen[m["type"]] = seen.get(m["type"], 0) + 1
                if m["type"] == "frame":
                    assert m["size"] == 20_000 and len(m["data"]) <= 1024
                if m["type"] == "stats":
                    assert set(m["blocks"]) == {"source", "detector", "recorder", "probe"}
            change = {"type": "set", "block": "detector", "name": "threshold_db", "value": 22}
            await ws.send(json.dumps(change))
            while (m := json.loads(await ws.recv()))["type"] != "ack":
                pass
            assert m["ok"], m
            await ws.send(json.dumps({"type": "set", "block": "detector", "name": "nope", "value": 1}))
            while (m := json.loads(await ws.recv()))["type"] != "ack":
                pass
            assert not m["ok"] and "no run-time parameter 'nope'" in m["error"]

    asyncio.run(asyncio.wait_for(session(), 60))
    assert rt.get_parameter("detector", "threshold_db") == 22


def test_page_and_not_found(demo):
    _rt, dash = demo
    page = urllib.request.urlopen(dash.url, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html") and b"multiqueue" in page.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{dash.port}/nope", timeout=10)
    assert info.value.code == 404


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no browser: install Debian's chromium and chromium-driver (.ci/run does)")
def test_the_page_in_a_headless_browser_shows_the_demo_and_sets_a_parameter(demo):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rt, dash = demo
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(dash.url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.execute_script("return window.mq.statsReceived") >= 3)
        table = driver.find_element(By.ID, "blocks").text
        for block in ("source", "detector", "recorder", "probe"):
            assert block in table
        wait.until(lambda d: "graph running: blocks source" in d.find_element(By.ID, "events").text)
        drawn = driver.execute_script("return window.mq.framesDrawn")
        wait.until(lambda d: d.execute_script("return window.mq.framesDrawn") >= drawn + 3)  # it updates
        driver.find_element(By.ID, "pblock").send_keys("detector")
        driver.find_element(By.ID, "pname").send_keys("threshold_db")
        driver.find_element(By.ID, "pvalue").send_keys("27.5")
        driver.find_element(By.ID, "pset").click()
        ack = wait.until(lambda d: d.execute_script("return window.mq.lastAck"))
        assert ack["ok"], ack
        assert "applied" in driver.find_element(By.ID, "ack").text
    finally:
        driver.quit()
    assert rt.get_parameter("detector", "threshold_db") == 27.5
