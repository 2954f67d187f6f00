"""Every built-in block of multiqueue.graph.blocks, run in real graphs.

Blocks whose values are the point run in threads (``placement="thread"``: the very
object runs, so its attributes can be read afterwards); the cross-process paths are
covered by a few graphs whose blocks share one or two worker processes (a spawned
worker costs about 0.3 s).  Every run must give back every pool block.
"""

import threading
import time

import numpy as np
import pytest
from graph_blocks import Ramp

from helpers import wait_until
from multiqueue import PoolConfig, ShmConfig
from multiqueue.errors import BlockError
from multiqueue.graph import (
    DONE,
    OK,
    Add,
    Amplifier,
    Block,
    Decimate,
    FileSink,
    FileSource,
    Multiply,
    NullSink,
    NullSource,
    Port,
    Probe,
    Runtime,
    SignalSource,
    Spectrum,
    SyncMerge,
    Tee,
    Throttle,
)

POOLS = ShmConfig(pools=[PoolConfig("frames", 4096, 256)], max_processes=32)
T = "thread"


# -- helper blocks (thread placement: never pickled, read after the run) ----------------------


class Collect(Block):
    """Keeps a copy of every frame with its timestamp, time range, buffer id and arrival
    time; ``enough`` is set once ``until`` frames arrived."""

    inputs = {"in": Port()}

    def __init__(self, until=None):
        super().__init__()
        self.until = until
        self.arrays, self.timestamps, self.ranges, self.ids, self.arrived_ns = [], [], [], [], []
        self.enough = threading.Event()

    def work(self, inputs):
        for frame in inputs["in"]:
            self.arrived_ns.append(time.monotonic_ns())
            self.arrays.append(frame.array.copy())
            self.timestamps.append(frame.timestamp)
            self.ranges.append(frame.time_range)
            self.ids.append(frame.buffer.id)
        if self.until is not None and len(self.arrays) >= self.until:
            self.enough.set()


class GatedRamp(Block):
    """``first`` frames (frame k holds k, k+1, ... stamped 1000 + k), then waits for
    ``gate`` before sending ``then`` more."""

    outputs = {"out": Port(np.float32)}

    def __init__(self, first, then, n=16):
        super().__init__()
        self.first, self.then, self.n = first, then, n
        self.k = 0
        self.gate = threading.Event()

    def work(self, inputs):
        if self.k >= self.first + self.then:
            return DONE
        if self.k == self.first and not self.gate.wait(0.05):
            return OK
        self.send("out", np.arange(self.k, self.k + self.n, dtype=np.float32), timestamp=1000 + self.k)
        self.k += 1
        return OK


def run(rt, duration=60):
    rt.run(duration=duration)
    assert rt.failures == []
    assert rt.blocks_in_use_at_end == 0


def chain(rt, *handles, out="out", into="in"):
    for a, b in zip(handles, handles[1:], strict=False):
        rt.connect(a[out], b[into])


# -- sources ------------------------------------------------------------------------------------


def test_null_source_sends_zero_frames_to_null_sinks_across_processes(domain):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(NullSource(frame=(4, 8), dtype=np.int16, count=30), name="src", placement="null")
    rt.add(NullSink(), name="sink_p", placement="null")  # shares the source's worker
    sink_t = NullSink()
    rt.add(sink_t, name="sink_t", placement=T)
    col = Collect()
    rt.add(col, name="col", placement=T)
    for dst in ("sink_p", "sink_t", "col"):
        rt.connect(src["out"], rt[dst]["in"])
    run(rt)
    assert len(col.arrays) == 30
    for a in col.arrays:
        assert a.dtype == np.int16 and a.shape == (4, 8) and not a.any()
    assert sink_t.received == 30
    stats = rt.final_stats.blocks
    assert stats["src"].items_out == 30 and stats["sink_p"].items_in == 30
    assert stats["sink_p"].pid == stats["src"].pid != stats["sink_t"].pid


def test_signal_source_sine_noise_chirp_match_numpy_and_the_sample_clock(domain):
    rate, frame, count = 8000, 64, 10
    k = np.arange(frame * count, dtype=np.float64)
    t = k / rate
    chirp_t = t % 0.05
    slope = (2000.0 - 100.0) / 0.05
    expected = {
        "sine": 0.5 * np.sin(2 * np.pi * 440.0 * t),
        "noise": 2.0 * np.random.default_rng(7).standard_normal(k.size),
        "chirp": 0.8 * np.sin(2 * np.pi * (100.0 * chirp_t + 0.5 * slope * chirp_t**2)),
    }
    sources = {
        "sine": SignalSource("sine", rate, frame, frequency=440.0, amplitude=0.5, count=count),
        "noise": SignalSource("noise", rate, frame, amplitude=2.0, count=count, seed=7),
        "chirp": SignalSource("chirp", rate, frame, frequency=100.0, amplitude=0.8, chirp_to=2000.0,
                              chirp_period=0.05, count=count, align_ns=1_000_000),
    }
    rt = Runtime(domain, pools=POOLS)
    cols = {}
    for name, source in sources.items():
        cols[name] = Collect()
        chain(rt, rt.add(source, name=name, placement=T), rt.add(cols[name], name=f"c_{name}", placement=T))
    run(rt)
    for name, col in cols.items():
        assert len(col.arrays) == count, name
        assert all(a.dtype == np.float32 and a.shape == (frame,) for a in col.arrays)
        got = np.concatenate(col.arrays)
        if name == "noise":
            np.testing.assert_array_equal(got, expected[name].astype(np.float32))  # seeded: reproducible
        else:
            np.testing.assert_allclose(got, expected[name], rtol=0, atol=2e-6, err_msg=name)
        # timestamps: the first sample's time on the sample clock; ranges tile the stream
        t0 = col.timestamps[0]
        starts = [t0 + round(i * frame * 1e9 / rate) for i in range(count + 1)]
        assert col.timestamps == starts[:-1], name
        assert col.ranges == list(zip(starts[:-1], starts[1:], strict=True)), name
        assert abs(t0 - time.monotonic_ns()) < 60e9  # the monotonic clock
    assert cols["chirp"].timestamps[0] % 1_000_000 == 0  # align_ns: on the grid


def test_signal_source_realtime_paces_at_the_sample_rate_and_stops_when_told(domain):
    rate, frame = 1000, 10  # 100 frames per second
    col = Collect()
    rt = Runtime(domain, pools=POOLS)
    chain(rt, rt.add(SignalSource("sine", rate, frame, frequency=50, realtime=True), name="src", placement=T),
          rt.add(col, name="col", placement=T))
    t0 = time.monotonic_ns()
    run(rt, duration=0.3)  # count=None: only the stop ends it
    elapsed_s = (time.monotonic_ns() - t0) / 1e9
    n = len(col.arrays)
    assert 3 <= n <= elapsed_s * rate / frame + 2  # paced, not as fast as possible
    period_ns = frame * 1e9 / rate
    for i, (ts, arrived) in enumerate(zip(col.timestamps, col.arrived_ns, strict=True)):
        assert ts == col.timestamps[0] + round(i * period_ns)
        assert arrived >= ts - 2_000_000  # no frame leaves before its time (2 ms of timer slack)


def test_file_source_reads_raw_and_npy_files(domain, tmp_path):
    raw = np.arange(1000, dtype=np.int16)
    raw.tofile(tmp_path / "raw.i16")
    cube = np.arange(5 * 3 * 4, dtype=np.float64).reshape(5, 3, 4)
    np.save(tmp_path / "cube.npy", cube)
    flat = np.arange(10, dtype=np.float32)
    np.save(tmp_path / "flat.npy", flat)
    (tmp_path / "empty.raw").write_bytes(b"")
    sources = {
        "raw": FileSource(tmp_path / "raw.i16", dtype=np.int16, frame=256),
        "cube": FileSource(tmp_path / "cube.npy"),
        "flat": FileSource(tmp_path / "flat.npy", frame=4),
        "empty": FileSource(tmp_path / "empty.raw"),
    }
    rt = Runtime(domain, pools=POOLS)
    cols = {}
    for name, source in sources.items():
        cols[name] = Collect()
        chain(rt, rt.add(source, name=name, placement=T), rt.add(cols[name], name=f"c_{name}", placement=T))
    run(rt)
    # raw: frames of 256 int16, the short last one as is
    assert [a.shape for a in cols["raw"].arrays] == [(256,), (256,), (256,), (232,)]
    assert all(a.dtype == np.int16 for a in cols["raw"].arrays)
    np.testing.assert_array_equal(np.concatenate(cols["raw"].arrays), raw)
    # .npy: frames along the first axis, dtype and shape kept
    assert len(cols["cube"].arrays) == 5
    for got, want in zip(cols["cube"].arrays, cube, strict=True):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    # 1-D .npy: cut into frames
    assert [a.tolist() for a in cols["flat"].arrays] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert cols["empty"].arrays == []
    stamps = cols["flat"].timestamps  # stamped when pushed: the monotonic clock, in order
    assert all(0 < a <= b for a, b in zip(stamps, stamps[1:], strict=False))


def test_file_source_loop_into_a_bounded_file_sink_which_never_stalls(domain, tmp_path):
    frames = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    np.save(tmp_path / "in.npy", frames)
    rec = FileSink(tmp_path / "rec.npy", max_frames=4)
    col = Collect(until=100)  # far more than the recorder's bound plus the queue's capacity
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(FileSource(tmp_path / "in.npy", loop=True), name="src", placement=T)
    rt.connect(src["out"], rt.add(rec, name="rec", placement=T)["in"])
    rt.connect(src["out"], rt.add(col, name="col", placement=T)["in"])
    with rt:
        rt.start()
        assert col.enough.wait(30), "the looping source stalled"
        rt.stop()
    assert rt.blocks_in_use_at_end == 0 and rt.failures == []
    n = len(col.arrays)
    assert n >= 100
    for i, a in enumerate(col.arrays):  # frame i is the file's frame i % 3
        np.testing.assert_array_equal(a, frames[i % 3])
    assert rec.written == 4 and rec.skipped == n - 4  # every frame was consumed
    assert rt.final_stats.blocks["src"].items_out == n
    saved = np.load(tmp_path / "rec.npy")
    assert saved.shape == (4, 8) and saved.dtype == np.float32
    np.testing.assert_array_equal(saved, frames[[0, 1, 2, 0]])
    assert not (tmp_path / "rec.npy.part").exists()


# -- transforms ---------------------------------------------------------------------------------


def test_amplifier_gain_changes_while_running_and_multiply_scales(domain):
    src = GatedRamp(first=6, then=6, n=16)
    col = Collect(until=6)
    rt = Runtime(domain, pools=POOLS)
    chain(rt, rt.add(src, name="src", placement=T),
          rt.add(Amplifier(gain=1.0), name="amp", placement="math"),
          rt.add(Multiply(0.5), name="mul", placement="math"),  # the same worker process
          rt.add(col, name="col", placement=T))
    assert rt.get_parameter("amp", "gain") == 1.0  # not running yet: the local object
    with rt:
        rt.start()
        assert col.enough.wait(30)  # frames 0..5 went through with gain 1
        rt.set_parameter("amp", "gain", 4.0)
        assert rt.get_parameter("amp", "gain") == 4.0  # read back from the worker
        assert rt.get_parameter("mul", "factor") == 0.5
        with pytest.raises(BlockError, match="no run-time parameter 'factor'"):
            rt.get_parameter("amp", "factor")  # Amplifier's parameter is gain
        src.gate.set()
        assert rt.wait(60)
    assert rt.blocks_in_use_at_end == 0 and rt.failures == []
    assert rt.final_stats.blocks["amp"].pid == rt.final_stats.blocks["mul"].pid
    assert len(col.arrays) == 12
    for k, (a, ts) in enumerate(zip(col.arrays, col.timestamps, strict=True)):
        gain = 1.0 if k < 6 else 4.0
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.arange(k, k + 16, dtype=np.float32) * gain * 0.5)
        assert ts == 1000 + k  # timestamps propagate through both blocks


def test_add_pairs_frames_in_order_and_ends_with_the_shorter_input(domain):
    col = Collect()
    rt = Runtime(domain, pools=POOLS)
    a = rt.add(Ramp(count=7, n=8), name="a", placement=T)
    b = rt.add(GatedRamp(first=5, then=0, n=8), name="b", placement=T)
    add = rt.add(Add(), name="add", placement=T)
    rt.connect(b["out"], add["b"])  # connected first: a is still Add's first input
    rt.connect(a["out"], add["a"])
    rt.connect(add["out"], rt.add(col, name="col", placement=T)["in"])
    run(rt)
    assert len(col.arrays) == 5
    for k, a_ in enumerate(col.arrays):
        np.testing.assert_array_equal(a_, 2 * np.arange(k, k + 8, dtype=np.float32))
    assert col.timestamps == [1_000_000 + k for k in range(5)]  # a's timestamps (Ramp's)


def test_spectrum_of_a_sine_peaks_at_its_bin(domain):
    rate, frame = 1024, 256
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(SignalSource("sine", rate, frame, frequency=128.0, count=4), name="src", placement=T)
    raw = Collect()
    rt.connect(src["out"], rt.add(raw, name="raw", placement=T)["in"])
    variants = {"hann": Spectrum(), "pad": Spectrum(fft_size=512, window="none"),
                "cut": Spectrum(fft_size=128)}
    cols = {}
    for name, spectrum in variants.items():
        cols[name] = Collect()
        rt.connect(src["out"], rt.add(spectrum, name=name, placement=T)["in"])
        rt.connect(rt[name]["out"], rt.add(cols[name], name=f"c_{name}", placement=T)["in"])
    run(rt)
    for name, n, window, peak in [("hann", 256, True, 32), ("pad", 512, False, 64), ("cut", 128, True, 16)]:
        col = cols[name]
        assert len(col.arrays) == 4
        for x, db in zip(raw.arrays, col.arrays, strict=True):
            assert db.dtype == np.float32 and db.shape == (n // 2 + 1,)
            assert int(np.argmax(db)) == peak, name
            x = x[:n]
            if window:
                x = x * np.hanning(x.size).astype(np.float32)
            want = 10 * np.log10(np.abs(np.fft.rfft(x, n)) ** 2 / n + 1e-20)
            np.testing.assert_allclose(db, want, rtol=1e-5, atol=1e-3, err_msg=name)
        assert col.timestamps == raw.timestamps  # the input frame's time
    with pytest.raises(ValueError, match="window"):
        Spectrum(window="hamming")


def test_decimate_keeps_every_nth_sample_or_averages(domain):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=5, n=12), name="src", placement=T)
    cols = {"plain": Collect(), "mean": Collect()}
    for name, block in {"plain": Decimate(3), "mean": Decimate(3, average=True)}.items():
        rt.connect(src["out"], rt.add(block, name=name, placement=T)["in"])
        rt.connect(rt[name]["out"], rt.add(cols[name], name=f"c_{name}", placement=T)["in"])
    run(rt)
    for k in range(5):
        x = np.arange(k, k + 12, dtype=np.float32)
        np.testing.assert_array_equal(cols["plain"].arrays[k], x[::3])
        np.testing.assert_array_equal(cols["mean"].arrays[k], x.reshape(4, 3).mean(axis=1))
    assert len(cols["plain"].arrays) == len(cols["mean"].arrays) == 5
    assert cols["mean"].timestamps == [1_000_000 + k for k in range(5)]


def test_decimate_refuses_a_frame_that_is_not_a_multiple_of_the_factor(domain):
    rt = Runtime(domain, pools=POOLS)
    chain(rt, rt.add(Ramp(count=3, n=12), name="src", placement=T),
          rt.add(Decimate(5), name="dec", placement=T), rt.add(NullSink(), name="sink", placement=T))
    with pytest.raises(BlockError, match="not a multiple of 5"):
        rt.run(duration=60)
    assert rt.blocks_in_use_at_end == 0
    with pytest.raises(ValueError):
        Decimate(0)


def test_throttle_bounds_the_frame_rate_and_forwards_without_copy(domain):
    rate, count = 200.0, 21  # 20 intervals of at least 5 ms
    col = Collect()
    rt = Runtime(domain, pools=POOLS)
    chain(rt, rt.add(Ramp(count=count, n=4), name="src", placement=T),
          rt.add(Throttle(rate), name="thr", placement=T), rt.add(col, name="col", placement=T))
    t0 = time.monotonic()
    run(rt)
    elapsed = time.monotonic() - t0
    assert len(col.arrays) == count
    for k, a in enumerate(col.arrays):
        np.testing.assert_array_equal(a, np.arange(k, k + 4, dtype=np.float32))
    assert col.timestamps == [1_000_000 + k for k in range(count)]  # forwarded: the source's own
    span_s = (col.arrived_ns[-1] - col.arrived_ns[0]) / 1e9
    assert 0.8 * (count - 1) / rate <= span_s < 10  # loose: paced, not a burst
    assert elapsed >= 0.8 * (count - 1) / rate


def test_tee_forwards_the_same_buffer_to_every_branch(domain):
    rt = Runtime(domain, pools=POOLS)
    tee = rt.add(Tee(3), name="tee", placement=T)
    rt.connect(rt.add(Ramp(count=8, n=4), name="src", placement=T)["out"], tee["in"])
    cols = [Collect() for _ in range(3)]
    for i, col in enumerate(cols):
        rt.connect(tee[f"out{i}"], rt.add(col, name=f"c{i}", placement=T)["in"])
    run(rt)
    for col in cols:
        assert len(col.arrays) == 8
        for k, a in enumerate(col.arrays):
            np.testing.assert_array_equal(a, np.arange(k, k + 4, dtype=np.float32))
        assert col.timestamps == [1_000_000 + k for k in range(8)]
    assert cols[0].ids == cols[1].ids == cols[2].ids  # one pool block per frame, shared
    assert list(Tee().output_ports()) == ["out0", "out1"]


def test_sync_merge_exact_and_nearest_align_two_sources_across_processes(domain):
    # Two sources on the same time grid: a's frames span 256 samples, b's 128, so b's
    # frame 2k starts with a's frame k.  align_ns is an hour so that both clocks start
    # on the same multiple (they start within milliseconds of each other).
    rate, align = 48_000, 3600 * 10**9
    rt = Runtime(domain, pools=POOLS)
    a = rt.add(SignalSource("sine", rate, 256, frequency=1000.0, count=16, align_ns=align),
               name="a", placement="src")
    b = rt.add(SignalSource("noise", rate, 128, count=32, seed=1, align_ns=align), name="b", placement="src")
    cols = {}
    for policy in ("exact", "nearest"):
        merge = rt.add(SyncMerge(2, policy), name=policy, placement="sync")
        rt.connect(a["out"], merge["in0"])
        rt.connect(b["out"], merge["in1"])
        for i in range(2):
            cols[policy, i] = Collect()
            rt.connect(merge[f"out{i}"], rt.add(cols[policy, i], name=f"{policy}{i}", placement=T)["in"])
    run(rt)
    noise = np.random.default_rng(1).standard_normal(32 * 128).astype(np.float32).reshape(32, 128)
    sine = np.sin(2 * np.pi * 1000.0 * np.arange(16 * 256) / rate).reshape(16, 256)
    for policy in ("exact", "nearest"):
        out0, out1 = cols[policy, 0], cols[policy, 1]
        assert len(out0.arrays) == len(out1.arrays) == 16, policy  # one tuple per frame of a
        assert out0.timestamps == out1.timestamps, policy
        t0 = out0.timestamps[0]
        assert t0 % align == 0
        assert out0.timestamps == [t0 + round(k * 256 * 1e9 / rate) for k in range(16)]
        for k in range(16):
            np.testing.assert_allclose(out0.arrays[k], sine[k], atol=2e-6)
            np.testing.assert_array_equal(out1.arrays[k], noise[2 * k])  # b's frame 2k
    stats = rt.final_stats.blocks
    assert stats["exact"].items_out == stats["nearest"].items_out == 32  # 16 tuples of 2
    assert stats["a"].pid == stats["b"].pid != stats["exact"].pid == stats["nearest"].pid


# -- sinks --------------------------------------------------------------------------------------


def test_file_sink_writes_npy_and_raw_files_from_another_process(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(SignalSource("noise", 8000, 64, count=12, seed=5), name="src", placement=T)
    col = Collect()
    rt.connect(src["out"], rt.add(col, name="col", placement=T)["in"])
    sinks = {"all": FileSink(tmp_path / "all.npy"), "raw": FileSink(tmp_path / "all.f32"),
             "first5": FileSink(tmp_path / "first5.npy", max_frames=5)}
    for name, sink in sinks.items():
        rt.connect(src["out"], rt.add(sink, name=name, placement="rec")["in"])
    run(rt)
    sent = np.stack(col.arrays)
    assert sent.shape == (12, 64)
    saved = np.load(tmp_path / "all.npy")
    assert saved.shape == (12, 64) and saved.dtype == np.float32
    np.testing.assert_array_equal(saved, sent)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "all.f32", np.float32), sent.ravel())
    np.testing.assert_array_equal(np.load(tmp_path / "first5.npy"), sent[:5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.f32", "all.npy", "first5.npy"]  # no .part
    assert rt.final_stats.blocks["first5"].items_in == 12  # bounded, yet it consumed everything


def test_file_sink_npy_refuses_frames_of_another_shape(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    np.save(tmp_path / "flat.npy", np.arange(10, dtype=np.float32))  # frames of 4, 4, 2
    chain(rt, rt.add(FileSource(tmp_path / "flat.npy", frame=4), name="src", placement=T),
          rt.add(FileSink(tmp_path / "out.npy"), name="rec", placement=T))
    with pytest.raises(BlockError, match="use a raw file"):
        rt.run(duration=60)
    assert rt.blocks_in_use_at_end == 0
    assert np.load(tmp_path / "out.npy").shape == (2, 4)  # what it had is still a valid file


def test_probe_keeps_the_latest_frame_for_the_runtime_process(domain):
    src = GatedRamp(first=5, then=3, n=8)
    probe = Probe()
    rt = Runtime(domain, pools=POOLS)
    chain(rt, rt.add(src, name="src", placement=T), rt.add(probe, name="probe", placement=T))
    assert probe.latest() is None  # nothing yet
    with rt:
        rt.start()
        wait_until(lambda: probe.received >= 5, "the probe has 5 frames")
        array, ts = probe.latest()
        np.testing.assert_array_equal(array, np.arange(4, 12, dtype=np.float32))
        assert ts == 1004
        array[:] = -1  # a copy: the probe's frame is untouched
        np.testing.assert_array_equal(probe.latest()[0], np.arange(4, 12, dtype=np.float32))
        src.gate.set()
        assert rt.wait(60)
    assert rt.blocks_in_use_at_end == 0 and rt.failures == []  # the kept reference was released
    assert probe.received == 8
