"""Fuzzing bad input (issue 7): graph files, bus payloads, segment headers, buffer ids.

Every target is driven by hypothesis (bounded example counts, the derandomized profile
of conftest.py) plus explicit reproducers.  The rule each test checks: bad input gives
a result or the error the docs name for it; never another exception type, never a
crash, never a hang.  Whatever could crash the interpreter (corrupt segments, garbage
ids in a queue ring) runs in a separate interpreter that attaches by domain name, so a
segfault shows up as a negative return code and fails the test instead of the run.

Cases marked ``xfail(strict=True, reason="bug: ...")`` are library bugs found here,
each with a minimal reproducer; they turn into failures once the library is fixed.
"""

import ctypes
import json
import mmap
import os
import queue
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from helpers import run_python, spawn_python
from multiqueue import (
    BufferReleasedError,
    InvalidBufferError,
    MultiQueueError,
    PoolConfig,
    ShmConfig,
    ShmManager,
)
from multiqueue.control import MAX_MESSAGE, Bus
from multiqueue.control.bus import BUS_POOL, HEADER
from multiqueue.errors import GraphFileError, MessageTooLargeError
from multiqueue.graph.graphfile import (
    BLOCK_KEYS,
    BUILTINS,
    EDGE_KEYS,
    POOL_KEYS,
    TOP_KEYS,
    load_graph,
    load_graph_text,
)
from multiqueue.graph.spec import GraphSpec
from multiqueue.shm import layout as L
from multiqueue.shm.segment import domain_segments, unlink_quietly
from multiqueue.stream import PortQueue
from multiqueue.stream.queue import Item, QueueHeader, ReaderRecord
from multiqueue.tools.doctor import diagnose

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "graphs").glob("*.yaml"))
WAIT = 30.0  # seconds a subscriber or worker may stay silent before the test calls it a hang
HANG_S = 10.0  # one attach attempt on a corrupt domain takes well under a second
SMALL = ShmConfig(pools=[PoolConfig("tiny", 256, 16), PoolConfig("small", 4096, 8)],
                  max_buffers=512, max_processes=8)
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example costs a subprocess round trip


def unique_domain(tag: str) -> str:
    return f"fz{tag}-{uuid.uuid4().hex[:10]}"


# ====================================================================== graph files

# Scalars and values of YAML documents.  Text never holds ':' or '.', so a random
# string is never an import path: the loader imports whatever module a class names,
# and fuzzing must not import random modules.  The parameter name "n" is left out
# because Tee(n=<huge>) / SyncMerge(n=<huge>) exhaust memory (a bug, reproduced in a
# memory-limited subprocess by test_graph_file_huge_port_count_is_refused below).
_TEXT = st.text(max_size=12).filter(lambda s: ":" not in s and "." not in s and s != "n")
_CLASSES = st.sampled_from([*BUILTINS, "graph_blocks:ramp_gen", "graph_blocks.Ints",
                            "multiqueue.graph.blocks:Amplifier", "numpy:pi", "no_such_module_fz:X",
                            "multiqueue.graph:NoSuchBlock", ":", "a:", ":b", "multiqueue..graph:X"])
_WORDS = st.sampled_from(["src.out -> amp.in", "amp.out -> sink.in", "src.out -> sink.in", "src.out",
                          "->", "a.b -> c.d", "process", "thread", "dsp", "", "stop", "restart", "block",
                          "drop_oldest", "sine", "hann", "tcp/127.0.0.1:7447", "frames", "src", "amp",
                          "sink", "out", "in", "yes", "null", "~", "0x10", "1e400", ".nan"])
_NUMBERS = (st.integers() | st.integers(-(2**200), 2**200) | st.sampled_from([0, 1, -1, 3, 16, 2**31, 2**64])
            | st.floats())
_SCALARS = st.none() | st.booleans() | _NUMBERS | _TEXT | _CLASSES | _WORDS
_KEYS = (st.sampled_from([*TOP_KEYS, *BLOCK_KEYS, *EDGE_KEYS, *POOL_KEYS, "zenoh", "listen", "connect",
                          "src", "amp", "sink", "gain", "count", "frame", "rate", "waveform", "<<"])
         | _TEXT)
_VALUES = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_KEYS, kids,
                                                                                              max_size=4),
                       max_leaves=20)
_PARAMS = st.dictionaries(st.sampled_from(["gain", "factor", "count", "frame", "rate", "waveform", "window",
                                           "fft_size", "dtype", "frequency", "realtime", "policy", "path"])
                          | _TEXT, _SCALARS | _VALUES, max_size=4)
_BLOCK = st.fixed_dictionaries({"class": _CLASSES | _SCALARS}, optional={
    "params": _PARAMS | _SCALARS, "placement": _SCALARS, "restart": _SCALARS, "max_restarts": _SCALARS,
    "host": _SCALARS, "bogus": _SCALARS})
_EDGE = _WORDS | _SCALARS | st.fixed_dictionaries(
    {"from": _WORDS | _SCALARS, "to": _WORDS | _SCALARS},
    optional={"policy": _SCALARS, "capacity": _SCALARS, "remote": _SCALARS, "key": _SCALARS})
_POOL = st.fixed_dictionaries({"name": st.sampled_from(["frames", "big"]) | _SCALARS,
                               "block_size": st.sampled_from([64, 4096]) | _NUMBERS,
                               "count": st.sampled_from([1, 8]) | _NUMBERS},
                              optional={"expandable": _SCALARS, "max_blocks": _NUMBERS | _SCALARS})
_GRAPHS = st.fixed_dictionaries(
    {"blocks": st.dictionaries(st.sampled_from(["src", "amp", "sink"]) | _TEXT, _BLOCK | _VALUES,
                               max_size=4) | _VALUES},
    optional={"connections": st.lists(_EDGE, max_size=4) | _VALUES,
              "capacity": st.sampled_from([1, 16, 64]) | _SCALARS,
              "domain": st.sampled_from(["fuzz", "fuzz-graph"]) | _SCALARS,
              "pools": st.lists(_POOL, max_size=3) | _VALUES,
              "hosts": st.dictionaries(_TEXT | _WORDS, st.none() | st.fixed_dictionaries(
                  {}, optional={"domain": _SCALARS, "zenoh": _VALUES})) | _VALUES})


def _loads_or_fails_cleanly(text: str, source: str = "fuzz.yaml"):
    """load_graph_text: a GraphSpec, or GraphFileError naming the source and a line."""
    try:
        spec = load_graph_text(text, source=source)
    except GraphFileError as e:
        assert str(e).startswith(f"{source}:{e.line}: ") and e.line >= 1, str(e)
        return e
    assert isinstance(spec, GraphSpec)
    return spec


def _dump(document) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False, width=200)


@settings(max_examples=400)
@given(document=_GRAPHS | _GRAPHS | _VALUES)
def test_graph_file_random_documents_load_or_raise_graph_file_error(document):
    _loads_or_fails_cleanly(_dump(document))


def _paths(node, prefix=()):
    """Every path (keys and indexes) to a node of a parsed document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutate_tree(data, document):
    """Delete, retype, rename or deeply nest one node of a parsed document."""
    paths = list(_paths(document))[1:]
    path = data.draw(st.sampled_from(paths), label="path")
    *parents, last = path
    parent = document
    for step in parents:
        parent = parent[step]
    op = data.draw(st.sampled_from(["delete", "retype", "rename", "nest", "huge", "unicode"]), label="op")
    if op == "delete":
        del parent[last]
    elif op == "retype":
        parent[last] = data.draw(_VALUES, label="value")
    elif op == "rename" and isinstance(parent, dict):
        new = data.draw(_KEYS | st.just(str(last)[:-1]) | st.just(f"{last}{last}"), label="key")
        parent[new] = parent.pop(last)
    elif op == "nest":
        value = parent[last]
        for _ in range(data.draw(st.integers(1, 40), label="depth")):
            value = data.draw(st.sampled_from([[value], {"x": value}, {"<<": value}]))
        parent[last] = value
    elif op == "huge":
        parent[last] = data.draw(st.sampled_from([10**100, -(10**100), 2**64, 2**63 - 1, 1e308, -0.0]))
    else:
        parent[last] = data.draw(st.text(min_size=1, max_size=20), label="unicode")
    return document


def _mutate_text(data, text: str) -> str:
    """Line-level edits of a graph file: duplicate (duplicate keys), delete, swap, splice, cut."""
    lines = text.splitlines(keepends=True)
    op = data.draw(st.sampled_from(["duplicate", "delete", "swap", "splice", "cut"]), label="text op")
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    if op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "delete":
        del lines[i]
    elif op == "swap":
        j = data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "splice":
        at = data.draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + data.draw(st.text(max_size=8), label="inserted") + lines[i][at:]
    else:
        return text[: data.draw(st.integers(0, len(text)), label="cut at")]
    return "".join(lines)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_graph_file_examples_load(path):
    assert isinstance(load_graph_text(path.read_text(), source=path.name), GraphSpec)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_graph_file_mutated_examples_load_or_raise_graph_file_error(path):
    original = path.read_text()

    @settings(max_examples=120)
    @given(data=st.data())
    def check(data):
        if data.draw(st.booleans(), label="edit the text"):
            text = _mutate_text(data, original)
        else:
            text = _dump(_mutate_tree(data, yaml.safe_load(original)))
        _loads_or_fails_cleanly(text, source=path.name)

    check()


@settings(max_examples=150)
@given(raw=st.binary(max_size=300))
def test_graph_file_random_text_loads_or_raises_graph_file_error(raw):
    _loads_or_fails_cleanly(raw.decode("utf-8", "replace"))
    _loads_or_fails_cleanly("blocks:\n  src: {class: NullSource}\n" + raw.decode("latin-1"))


def test_graph_file_random_bytes_on_disk_load_or_raise_graph_file_error(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-graphs")
    path = directory / "fuzz.yaml"
    saved = list(sys.path)

    @settings(max_examples=60)
    @example(raw=b"blocks:\n  \xff: {class: NullSource}\n")
    @given(raw=st.binary(max_size=200))
    def check(raw):
        path.write_bytes(raw)
        try:
            load_graph(path)
        except GraphFileError as e:
            assert str(e).startswith(f"{path}:"), str(e)

    try:
        check()
    finally:
        sys.path[:] = saved  # load_graph appends the file's directory


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["blocks", "params", "connections"])
@pytest.mark.parametrize("depth", [
    60,
    5000,
])
def test_graph_file_deep_nesting_raises_graph_file_error(where, depth):
    text = {"blocks": f"blocks: {_nested(depth)}\n",
            "params": f"blocks:\n  a: {{class: Amplifier, params: {{gain: {_nested(depth)}}}}}\n",
            "connections": f"blocks:\n  a: {{class: NullSource}}\nconnections: [{_nested(depth)}]\n"}[where]
    with pytest.raises(GraphFileError):
        load_graph_text(text)


_HUGE_NUMBER_AT = {
    "capacity": "capacity: {n}\nblocks: {{a: {{class: NullSource}}}}\n",
    "params": "blocks: {{a: {{class: NullSource, params: {{count: {n}}}}}}}\n",
    "pools": "pools: [{{name: p, block_size: {n}, count: 1}}]\nblocks: {{a: {{class: NullSource}}}}\n",
}


@pytest.mark.parametrize("where, digits", [
    *[(where, 400) for where in _HUGE_NUMBER_AT],
    ("capacity", 5000),
    ("params", 5000),
    ("pools", 5000),  # PoolConfig's ValueError is caught there: a GraphFileError
])
def test_graph_file_huge_numbers_give_a_graph_or_graph_file_error(where, digits):
    _loads_or_fails_cleanly(_HUGE_NUMBER_AT[where].format(n="9" * digits))


def test_graph_file_alias_bomb_loads_quickly():
    """A 'billion laughs' document: aliases are shared, never expanded, and no error
    message prints the whole structure (pytest-timeout catches a hang)."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        ref = f"*{chr(96 + i)}"
        levels.append(f"&{chr(97 + i)} [{', '.join([ref] * 9)}]")
    text = f"blocks:\n  s: {{class: Amplifier, params: {{gain: [{', '.join(levels)}]}}}}\n"
    error = _loads_or_fails_cleanly(text)
    assert isinstance(error, GraphFileError) and len(str(error)) < 2000


HUGE_PORT_COUNT = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (320 << 20, 320 << 20))  # a leak ends in MemoryError, fast
from multiqueue.graph.graphfile import GraphFileError, load_graph_text
try:
    load_graph_text(sys.argv[1])
except GraphFileError as e:
    print("GraphFileError", e)
except BaseException as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("block", ["Tee", "SyncMerge"])
def test_graph_file_huge_port_count_is_refused(block):
    text = f"blocks:\n  t: {{class: {block}, params: {{n: 1000000000000}}}}\n"
    result = run_python(HUGE_PORT_COUNT, text, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("GraphFileError"), result.stdout


# ====================================================================== bus payloads

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=30)
_NEAR_LIMIT = st.integers(MAX_MESSAGE - 3, MAX_MESSAGE + 3)
_BYTES = (st.binary(max_size=600)
          | st.tuples(_NEAR_LIMIT, st.binary(min_size=1, max_size=4)).map(lambda t: (t[1] * t[0])[: t[0]]))
_BIG_TEXT = st.tuples(_NEAR_LIMIT, st.sampled_from(["a", "é", "\u20ac", "\"", "\\"])).map(
    lambda t: t[1] * (t[0] - 2))  # a JSON string near the limit (escapes make some longer)
_NOT_JSON = st.sampled_from([{1, 2}, object(), 1j, {"a": b"bytes"}, {(1, 2): 3}, [frozenset()], Ellipsis])


def _encoded(data) -> bytes | None:
    """The payload bytes the bus carries for ``data`` (None: not JSON-able)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    try:
        return json.dumps(data, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return None


def test_bus_delivers_exactly_what_was_published(domain):
    """Bytes arrive as the same bytes, JSON as an equal object; oversized payloads raise
    MessageTooLargeError and non-JSON-able objects TypeError at publish, and then
    nothing arrives; no bus block is left in use."""
    with ShmManager(domain, SMALL, reaper_interval=None) as m, Bus(m) as bus:
        sub = bus.subscribe("fuzz")

        @settings(max_examples=200)
        @given(data=_BYTES | _BYTES.map(bytearray) | _BYTES.map(memoryview) | _JSON | _BIG_TEXT | _NOT_JSON)
        def check(data):
            body = _encoded(data)
            if body is None:
                with pytest.raises(TypeError, match="JSON-able"):
                    bus.publish("fuzz", data)
            elif len(body) > MAX_MESSAGE:
                with pytest.raises(MessageTooLargeError, match=f"{len(body)} bytes"):
                    bus.publish("fuzz", data)
            else:
                bus.publish("fuzz", data)
                message = sub.get(timeout=WAIT)
                assert message is not None, "a published message did not arrive"
                if isinstance(data, (bytes, bytearray, memoryview)):
                    assert type(message.data) is bytes and message.data == bytes(data)
                else:
                    assert message.data == data
                assert (message.topic, message.sender_pid) == ("fuzz", os.getpid())
            assert sub.get(timeout=0) is None, "more arrived than was published"
            assert m.get_pool(BUS_POOL).stats().blocks_used == 0

        check()
        sub.close()
        assert diagnose(domain).ok


PAYLOAD_SUBSCRIBER = r"""
import base64, json, sys
from multiqueue import ShmManager
from multiqueue.control import Bus

with ShmManager(sys.argv[1], create=False, reaper_interval=None) as m, Bus(m) as bus:
    sub = bus.subscribe("fuzz")
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        msg = sub.get(timeout=60)
        data = {"b64": base64.b64encode(msg.data).decode()} if isinstance(msg.data, bytes) else msg.data
        print(json.dumps({"data": data, "seq": msg.seq}), flush=True)
"""


def test_bus_payloads_cross_processes_intact(domain):
    """Edge payloads reach a subscriber in another interpreter unchanged, in order."""
    import base64

    payloads = [b"", b"\x00", bytes(range(256)) * 15, b"\xff" * MAX_MESSAGE, None, 0, -(2**100), 1e308,
                "", "\u20ac\U0001f600\x00", "x" * (MAX_MESSAGE - 2), {"": [[], {}, [None]]}, [True, False]]
    with ShmManager(domain, SMALL, reaper_interval=None) as m, Bus(m) as bus:
        proc = spawn_python(PAYLOAD_SUBSCRIBER, domain, len(payloads))
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
            for payload in payloads:
                bus.publish("fuzz", payload)
            received = [json.loads(proc.stdout.readline()) for _ in payloads]
        except BaseException:
            proc.kill()  # it would wait for messages that never come
            raise
        finally:
            out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
    decoded = [base64.b64decode(r["data"]["b64"]) if isinstance(r["data"], dict) and "b64" in r["data"]
               else r["data"] for r in received]
    assert decoded == payloads
    assert [r["seq"] for r in received] == sorted(r["seq"] for r in received)


def _inject(m: ShmManager, topic: PortQueue, raw: bytes, size: int | None = None) -> None:
    """What a buggy or hostile process can do: a bus block with any bytes, pushed into the
    topic's queue without Bus.publish (so without its encoding)."""
    block = m.allocate_from_pool(BUS_POOL, size or max(1, len(raw)))
    block.memoryview()[: len(raw)] = raw
    topic.push(block, timeout=0)


GOOD = {"after": "garbage"}
GARBAGE = {  # raw block, its size (None: 4 KiB), what get() delivers before GOOD (None: skipped)
    "well-formed (control)": (HEADER.pack(0, 0, 5, 1, 1, 0) + b"hello", None, b"hello"),
    "body not JSON": (HEADER.pack(1, 0, 3, 1, 1, 0) + b"{{{", None, None),
    "block shorter than the header": (b"\x01", 1, None),
    "length beyond the block": (HEADER.pack(0, 0, 65535, 1, 1, 0) + b"abc", None, None),
    "unknown kind": (HEADER.pack(7, 0, 3, 1, 1, 0) + b"abc", None, None),
}


@pytest.mark.parametrize("raw, size, expected", GARBAGE.values(), ids=GARBAGE.keys())
def test_bus_subscriber_survives_garbage_in_a_bus_block(domain, raw, size, expected):
    """A subscriber given a hand-made message delivers it (well-formed) or skips it
    (counted in ``invalid``, its block released); then it goes on to the next message."""
    with ShmManager(domain, SMALL, reaper_interval=None) as m, Bus(m) as bus:
        sub = bus.subscribe("t")
        with PortQueue(m, "b-t", create=False, multi_producer=True) as topic:
            _inject(m, topic, raw, size)
        bus.publish("t", GOOD)
        seen = []
        while not seen or seen[-1] != GOOD:
            message = sub.get(timeout=WAIT)
            assert message is not None, f"the good message did not arrive (seen {seen})"
            seen.append(message.data)
        assert seen == ([GOOD] if expected is None else [expected, GOOD])
        assert sub.invalid == (1 if expected is None else 0)
        assert m.get_pool(BUS_POOL).stats().blocks_used == 0


@settings(max_examples=80)
@example(kind=1, length=3, body=b"{{{")
@given(kind=st.sampled_from([0, 1]) | st.integers(0, 255), length=st.integers(0, 70) | st.integers(0, 65535),
       body=st.binary(max_size=64))
def test_bus_subscriber_survives_random_bus_blocks(kind, length, body):
    domain = unique_domain("bus")
    try:
        with ShmManager(domain, SMALL, reaper_interval=None) as m, Bus(m) as bus:
            sub = bus.subscribe("t")
            with PortQueue(m, "b-t", create=False, multi_producer=True) as topic:
                _inject(m, topic, HEADER.pack(kind, 0, length, 7, 1, 0) + body)
            bus.publish("t", GOOD)
            for _ in range(2):
                try:
                    message = sub.get(timeout=WAIT)
                except MultiQueueError:
                    continue
                if message is not None and message.data == GOOD:
                    break
            else:
                raise AssertionError("the good message after the garbage did not arrive")
    finally:
        for path in domain_segments("mq.", domain):
            unlink_quietly(path)


def test_bus_callback_subscription_survives_garbage(domain):
    delivered, crashed = threading.Event(), []
    previous_hook = threading.excepthook

    def hook(args):  # an exception that ends a thread: record it, and stop waiting
        crashed.append(args.exc_value)
        delivered.set()

    threading.excepthook = hook
    try:
        with ShmManager(domain, SMALL, reaper_interval=None) as m, Bus(m) as bus:
            bus.subscribe("t", callback=lambda message: message.data == GOOD and delivered.set())
            with PortQueue(m, "b-t", create=False, multi_producer=True) as topic:
                _inject(m, topic, HEADER.pack(1, 0, 3, 1, 1, 0) + b"{{{")
            bus.publish("t", GOOD)
            assert delivered.wait(WAIT)
            assert not crashed, f"the callback thread died: {crashed[0]!r}"
    finally:
        threading.excepthook = previous_hook


RING_SUBSCRIBER = r"""
import json, sys
from multiqueue import MultiQueueError, ShmManager
from multiqueue.control import Bus

with ShmManager(sys.argv[1], create=False, reaper_interval=None, name="subscriber") as m, Bus(m) as bus:
    sub = bus.subscribe("t")
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:  # one line per round: read until the good message
        seen = []
        for _ in range(2):
            try:
                message = sub.get(timeout=60)
            except MultiQueueError as e:
                seen.append("error " + type(e).__name__)
                continue
            seen.append(message.data.decode() if message is not None else None)
            if seen[-1] == "good":
                break
        print(json.dumps(seen), flush=True)
"""


class _TopicRing:
    """The ring of a topic's queue segment, mapped by file name (bypassing every API)."""

    def __init__(self, domain: str, topic: str):
        with open(f"/dev/shm/mq.{domain}.q.b-{topic}", "r+b") as f:
            self.mm = mmap.mmap(f.fileno(), 0)
        self.header = QueueHeader.from_buffer_copy(self.mm)
        self.ring_at = ctypes.sizeof(QueueHeader) + self.header.max_readers * ctypes.sizeof(ReaderRecord)

    def overwrite_newest(self, buffer_id: int) -> int:
        """Replace the id of the newest item; returns the id it had."""
        head = struct.unpack_from("<Q", self.mm, QueueHeader.head.offset)[0]
        offset = self.ring_at + ((head - 1) & self.header.mask) * ctypes.sizeof(Item) + Item.id.offset
        (old,) = struct.unpack_from("<Q", self.mm, offset)
        struct.pack_into("<Q", self.mm, offset, buffer_id)
        return old


RING_IDS = {
    "stale generation, slot in range": (5 << 32) | 3,
    "generation 0": 0,
    "slot past the table": (1 << 32) | 0xFFFFFFFF,
}


@pytest.mark.parametrize("garbage", RING_IDS.values(), ids=RING_IDS.keys())
def test_bus_subscriber_survives_garbage_ids_in_the_topic_ring(domain, garbage):
    """A garbage id written into a topic's ring (a hostile process, or a stray write) makes
    the subscriber in another interpreter raise a documented error or skip it, then read on;
    and the domain stays consistent once it has left."""
    with ShmManager(domain, SMALL, reaper_interval=None, name="publisher") as m, Bus(m) as bus:
        proc = spawn_python(RING_SUBSCRIBER, domain)
        try:
            assert json.loads(proc.stdout.readline() or '""') == "ready", proc.stderr.read()
            ring = _TopicRing(domain, "t")
            victims = []
            for _ in range(2):
                bus.publish("t", b"victim")
                victims.append(ring.overwrite_newest(garbage))
                bus.publish("t", b"good")
                proc.stdin.write("read\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                assert line, f"the subscriber died: return code {proc.wait(WAIT)}, {proc.stderr.read()}"
                seen = json.loads(line)
                assert seen[-1] == "good" and all(s.startswith("error ") for s in seen[:-1]), seen
            ring.mm.close()
        except BaseException:
            proc.kill()
            raise
        finally:
            out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, f"subscriber return code {proc.returncode}: {err}"
        report = diagnose(domain)
        # the overwritten items' queue references are lost for good: those two leaks are expected
        unexpected = [f for f in report.findings if not (f.kind == "leak" and set(f.buffers) <= set(victims))]
        assert not unexpected, report.format()


# ====================================================================== segment headers

SEGMENT_WORKER = r"""
import faulthandler, json, sys, traceback
faulthandler.enable()  # a crash prints where it happened before the process dies of its signal
from multiqueue import ShmManager
from multiqueue.tools.doctor import diagnose
from multiqueue.stream import PortQueue

HANG_S = float(sys.argv[1])


def failure(step, e):
    return {"step": step, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
            "message": str(e)[:400], "where": traceback.format_exc()[-800:]}


def attempt(domain):
    out = []
    try:
        diagnose(domain).format()
        out.append({"step": "diagnose"})
    except Exception as e:
        out.append(failure("diagnose", e))
    m, step = None, "attach"
    try:
        m = ShmManager(domain, create=False, reaper_interval=None, name="fuzz")
        step = "stats"
        m.config, m.get_stats(), m.processes()
        for name in m.list_pools():
            step = f"pool {name}"
            with m.allocate_from_pool(name, timeout=0) as b:
                b.memoryview()[:1] = b"x"
                b.numpy()[:1]
                b.timestamp = 5
                m.get(b.id).release()
        step = "allocate"
        m.allocate(64, timeout=0).release()
        step = "queue"
        with PortQueue(m, "q1", create=False) as q:
            reader = q.reader()
            q.push(m.allocate(64, timeout=0), timeout=0)
            reader.pop(timeout=0).release()
            reader.detach()
            q.stats()
        step = "reap"
        m.reap()
        out.append({"step": "operations"})
    except Exception as e:
        out.append(failure(step, e))
    if m is not None:
        try:
            m.shutdown()
        except Exception as e:
            out.append(failure("shutdown", e))
    return out


for line in sys.stdin:
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang ends the worker, with a traceback
    result = attempt(line.strip())
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(result), flush=True)
"""


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")  # end of output: the process exited


class _Worker:
    """A separate interpreter that attaches to domains by name on request (one at a time);
    a crash or a hang ends it, and the next request starts a new one."""

    def __init__(self):
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SEGMENT_WORKER, str(HANG_S)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self.errors.extend, args=(self.proc.stderr,), daemon=True).start()

    def attempt(self, domain: str) -> list[dict]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(domain + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=HANG_S + WAIT)  # the worker's own watchdog fires first
        except queue.Empty:
            self.proc.kill()
            line = ""
        if line:
            return json.loads(line)
        code = self.proc.wait(WAIT)
        stderr = "".join(self.errors)[-3000:]
        what = f"killed by signal {-code}" if code < 0 else f"exited with {code} (hang: watchdog)"
        raise AssertionError(f"attaching to a corrupt domain: the process {what}\n{stderr}")

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(WAIT)


@pytest.fixture(scope="module")
def worker():
    w = _Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def template():
    """The segment files of a small domain (two pools, one expandable; a queue that carried
    an item), as bytes by their name after the domain's: copies of them make new domains."""
    domain = unique_domain("tpl")
    try:
        m = ShmManager(domain, ShmConfig(pools=[PoolConfig("small", 256, 8),
                                                PoolConfig("big", 4096, 4, expandable=True, max_blocks=8)],
                                         max_buffers=64, max_processes=4), reaper_interval=None)
        with PortQueue(m, "q1", 8, multi_producer=True) as q:  # no producer recorded
            reader = q.reader()
            q.push(m.allocate(100))
            reader.pop(timeout=WAIT).release()
            reader.detach()
        m.shutdown(unlink=False)
        start = len(f"/dev/shm/mq.{domain}.")
        files = {path[start:]: Path(path).read_bytes() for path in domain_segments("mq.", domain)}
    finally:
        for path in domain_segments("mq.", domain):
            unlink_quietly(path)
    assert {"ctl", "q.q1"} <= set(files) and sum(name.startswith("pool.") for name in files) == 2
    return _Files(files)


class _Files(dict):
    """Segment file contents by name; a short repr for hypothesis's failure reports."""

    def __repr__(self) -> str:
        return f"<segment files {', '.join(f'{n} ({len(b)} bytes)' for n, b in self.items())}>"


def _write_domain(files: dict[str, bytes]) -> str:
    domain = unique_domain("seg")
    for name, content in files.items():
        fd = os.open(f"/dev/shm/mq.{domain}.{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
    return domain


def _attach_copy(worker, files: dict[str, bytes]) -> list[dict]:
    domain = _write_domain(files)
    try:
        return worker.attempt(domain)
    finally:
        for path in domain_segments("mq.", domain):
            unlink_quietly(path)


HEADERS = {"ctl": ctypes.sizeof(L.Control), "pool": ctypes.sizeof(L.SegmentHeader),
           "queue": ctypes.sizeof(QueueHeader)}  # the bytes a corruption may hit in each kind
# where the fields that say how to read the rest are: the segment header, the control
# header's counts and table offsets, the queue's geometry, lock and cursors
HOT = {"ctl": (0, ctypes.sizeof(L.Control) - ctypes.sizeof(L.Stats)), "pool": (0, 64),
       "queue": (64, QueueHeader.data_event.offset)}
SPECIAL = [0, 1, 2, 3, 7, 8, 64, 255, 4096]


@st.composite
def corruptions(draw):
    """(file kind, which file, operation, arguments): one corruption of one segment header."""
    kind = draw(st.sampled_from(["ctl", "ctl", "pool", "queue", "queue"]))
    which = draw(st.integers(0, 1))
    size = HEADERS[kind]
    lo, hi = HOT[kind]
    offsets = st.integers(lo, hi - 1) | st.integers(0, size - 1)
    op = draw(st.sampled_from(["flip", "u32", "u64", "bytes", "truncate"]))
    if op == "flip":
        args = (draw(offsets), draw(st.integers(0, 7)))
    elif op in ("u32", "u64"):
        width = 4 if op == "u32" else 8
        limit = 2 ** (8 * width)
        value = draw(st.sampled_from([*SPECIAL, limit - 1, limit // 2]) | st.integers(0, limit - 1))
        args = (min(draw(offsets), size - width) // width * width, value)
    elif op == "bytes":
        args = (draw(offsets), draw(st.binary(min_size=1, max_size=16)))
    else:
        lengths = st.sampled_from([0, 1, 8, 63, 64, 65, size - 1, size, size + 1]) | st.integers(0, 2**20)
        args = (draw(lengths),)
    return kind, which, op, args


def _corrupt(files: dict[str, bytes], corruption) -> dict[str, bytes]:
    kind, which, op, args = corruption
    prefix = {"ctl": "ctl", "pool": "pool.", "queue": "q."}[kind]
    names = sorted(n for n in files if n.startswith(prefix))
    name = names[which % len(names)]
    data = bytearray(files[name])
    if op == "flip":
        data[args[0]] ^= 1 << args[1]
    elif op in ("u32", "u64"):
        width = 4 if op == "u32" else 8
        data[args[0] : args[0] + width] = args[1].to_bytes(width, "little")
    elif op == "bytes":
        data[args[0] : args[0] + len(args[1])] = args[1]
        del data[len(files[name]) :]
    else:
        del data[args[0] % len(data) :]
    return {**files, name: bytes(data)}


def _unclear(steps: list[dict]) -> list[str]:
    """The outcomes that are neither success nor a documented error: a MultiQueueError,
    and for a SegmentError one that names the segment file."""
    bad = []
    for s in steps:
        if "type" not in s:
            continue
        documented = "MultiQueueError" in s["mro"] or s["type"] == "TimeoutError"  # pop(timeout=0)
        if not documented or ("SegmentError" in s["mro"] and "/dev/shm/" not in s["message"]):
            bad.append(f"{s['step']}: {s['type']}: {s['message']}\n{s['where']}")
    return bad


def test_segment_template_attaches_cleanly(worker, template):
    """Uncorrupted copies attach, allocate, queue and diagnose without any error."""
    assert _attach_copy(worker, template) == [{"step": "diagnose"}, {"step": "operations"}]


@settings(max_examples=800, phases=NO_SHRINK)
@given(corruption=corruptions())
def test_corrupt_segment_headers_never_crash_or_hang(worker, template, corruption):
    """Attach, allocate, map blocks, open and use the queue, diagnose: on a corrupt copy
    the separate interpreter answers (any Python exception at worst), never dies or hangs."""
    _attach_copy(worker, _corrupt(template, corruption))


@settings(max_examples=100, phases=NO_SHRINK)
@given(corruption=corruptions())
def test_corrupt_segment_headers_give_documented_errors(worker, template, corruption):
    bad = _unclear(_attach_copy(worker, _corrupt(template, corruption)))
    assert not bad, "\n".join(bad)


def _put(offset: int, fmt: str, value):
    return lambda data: struct.pack_into(fmt, data, offset, value)


def _cut(length: int):
    return lambda data: data.__delitem__(slice(length, None))


_CTL, _SEG, _QH = L.Control, L.SegmentHeader, QueueHeader
HEADER_CASES = {
    # (file, edit, attach outcome: "SegmentError" / "SegmentVersionError" / "ok"; xfail reason or None)
    "control truncated to 0": ("ctl", _cut(0), "SegmentError", None),
    "control truncated mid segment header": ("ctl", _cut(40), "SegmentError", None),
    "control truncated after the header": ("ctl", _cut(1000), "SegmentError", None),
    "control magic": ("ctl", _put(_SEG.magic.offset, "<Q", 0x1234), "SegmentError", None),
    "control kind": ("ctl", _put(_SEG.kind.offset, "<I", 2), "SegmentError", None),
    "control version": ("ctl", _put(_SEG.version.offset, "<I", 99), "SegmentVersionError", None),
    "control total_size": ("ctl", _put(_SEG.total_size.offset, "<Q", 1 << 40), "SegmentError", None),
    "control max_processes 0": ("ctl", _put(_CTL.max_processes.offset, "<I", 0), "SegmentError", None),
    "control max_buffers 2**31": ("ctl", _put(_CTL.max_buffers.offset, "<I", 2**31), "SegmentError", None),
    "control procs_offset 2**63": ("ctl", _put(_CTL.procs_offset.offset, "<Q", 2**63), "SegmentError", None),
    "control ledger_offset past the end": ("ctl", _put(_CTL.ledger_offset.offset + 4, "<I", 255),
                                           "SegmentError", None),
    "control meta_offset 1": ("ctl", _put(_CTL.meta_offset.offset, "<Q", 1), "SegmentError", None),
    "control meta_offset 8": ("ctl", _put(_CTL.meta_offset.offset, "<Q", 8), "SegmentError", None),
    "control pools_offset moved but inside": ("ctl", _put(_CTL.pools_offset.offset, "<Q", 0), "SegmentError",
                                              None),
    "pool truncated to 0": ("pool", _cut(0), "SegmentError", None),
    "pool truncated mid header": ("pool", _cut(32), "SegmentError", None),
    "pool truncated in its blocks": ("pool", _cut(4096 + 100), "SegmentError", None),
    "pool magic": ("pool", _put(_SEG.magic.offset, "<Q", 0), "SegmentError", None),
    "pool version": ("pool", _put(_SEG.version.offset, "<I", 99), "SegmentVersionError", None),
    "queue truncated to 0": ("queue", _cut(0), "SegmentError", None),
    "queue truncated in its header": ("queue", _cut(200), "SegmentError", None),
    "queue magic": ("queue", _put(_SEG.magic.offset, "<Q", 0), "SegmentError", None),
    "queue version": ("queue", _put(_SEG.version.offset, "<I", 0), "SegmentVersionError", None),
    "queue capacity 3": ("queue", _put(_QH.capacity.offset, "<I", 3), "SegmentError", None),
    # a lock word naming no process, or the attacher itself (whose C calls never return
    # holding it), is a stray write: the lock is taken back and everything works
    "queue lock held by slot 99": ("queue", _put(_QH.lock.offset, "<I", 99), "ok", None),
    "queue lock held by the attacher itself": ("queue", _put(_QH.lock.offset, "<I", 1), "ok", None),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason) if reason else ())
    for name, (_, _, _, reason) in HEADER_CASES.items()])
def test_corrupt_header_gives_segment_error(worker, template, case):
    """One corruption each: diagnose and the first operation that touches the segment
    raise SegmentError (or SegmentVersionError) naming the file; nothing else fails."""
    kind, edit, expected, _ = HEADER_CASES[case]
    prefix = {"ctl": "ctl", "pool": "pool.small", "queue": "q."}[kind]
    name = next(n for n in template if n.startswith(prefix))
    data = bytearray(template[name])
    edit(data)
    steps = _attach_copy(worker, {**template, name: bytes(data)})
    failed = [s for s in steps if "type" in s]
    if expected == "ok":
        assert not failed, failed
        return
    assert failed, f"the corruption went unnoticed: {steps}"
    assert not _unclear(steps), "\n".join(_unclear(steps))
    assert failed[-1]["type"] == expected and f".{name}" in failed[-1]["message"], failed
    if kind == "ctl":
        assert [s["step"] for s in failed] == ["diagnose", "attach"], failed


# ====================================================================== buffer ids


def test_random_buffer_ids_are_refused(domain):
    """manager.get() of any int but a live id raises InvalidBufferError naming it; a
    live id gives a new reference; nothing changes in the domain."""
    with ShmManager(domain, SMALL, reaper_interval=None) as m:
        live = m.allocate(100)
        freed = m.allocate(100)
        freed_id = freed.id
        freed.release()

        @settings(max_examples=300)
        @example(buffer_id=freed_id)
        @example(buffer_id=live.id)
        @example(buffer_id=live.id + (1 << 32))
        @example(buffer_id=live.id | 0xFFFFFFFF)
        @given(buffer_id=st.integers(-(2**70), 2**70) | st.integers(0, 2**64 - 1)
               | st.builds(lambda gen, slot: gen << 32 | slot, st.integers(0, 2**32 - 1),
                           st.sampled_from([0, 1, 15, 16, 23, 24, 511, 512, 513, 2**31, 2**32 - 1])))
        def check(buffer_id):
            if buffer_id == live.id:
                with m.get(buffer_id) as again:
                    assert again.ref_count == 2
                return
            with pytest.raises(InvalidBufferError, match=f"{buffer_id:#x}"):
                m.get(buffer_id)
            assert live.ref_count == 1

        check()
        assert m.get_stats().total_allocated == 1
        live.release()
        assert m.get_stats().total_allocated == 0 and diagnose(domain).ok


@pytest.mark.parametrize("bad", [None, "1", b"\x01", 1.0, float("nan"), True, False, [1], (1,), {1: 2},
                                 object(), 1 + 0j])
def test_buffer_ids_of_the_wrong_type_raise_type_error(manager, bad):
    with pytest.raises(TypeError, match="buffer id must be an int"):
        manager.get(bad)


def test_reused_slots_refuse_their_old_ids(manager):
    """A released block's id is dead for good: its slot's next allocation has a new
    generation, so the old id never reaches the new buffer."""
    seen: dict[int, int] = {}
    old_ids = []
    for _ in range(40):  # the tiny pool has 16 blocks: every slot is reused
        b = manager.allocate_from_pool("tiny")
        slot = b.id & 0xFFFFFFFF
        assert b.id != seen.get(slot), "a reused slot got the same id"
        seen[slot] = b.id
        old_ids.append(b.id)
        b.release()
        with pytest.raises(InvalidBufferError):
            manager.get(b.id)
    current = manager.allocate_from_pool("tiny")
    for old in old_ids:
        if old != current.id:
            with pytest.raises(InvalidBufferError):
                manager.get(old)
    current.release()
    assert manager.get_stats().total_allocated == 0


_OPS = st.lists(st.one_of(
    st.tuples(st.just("allocate"), st.integers(1, 4096)),
    st.tuples(st.just("release"), st.integers(0, 63)),
    st.tuples(st.just("release twice"), st.integers(0, 63)),
    st.tuples(st.just("get"), st.integers(0, 63)),
    st.tuples(st.just("share"), st.integers(0, 63)),
    st.tuples(st.just("push raw id"), st.integers(0, 63)),
    st.tuples(st.just("push released"), st.integers(0, 63)),
    st.tuples(st.just("get random"), st.integers(0, 2**64 - 1)),
), min_size=5, max_size=60)


def test_buffer_operations_keep_the_domain_consistent(domain):
    """Random sequences of allocate / release / double release / get of live, released and
    reused ids / share / pushing raw ids: each raises its documented error or works, the
    reference counts match a model, and afterwards nothing is left and the doctor is happy."""
    with ShmManager(domain, SMALL, reaper_interval=None) as m, PortQueue(m, "ids", 8) as q:
        reader = q.reader("drop_oldest")

        @settings(max_examples=200)
        @given(ops=_OPS)
        def check(ops):
            handles = []  # every handle ever made in this example, live or not
            refs: dict[int, int] = {}  # id -> references held through live handles
            ever: list[int] = []
            for op, arg in ops:
                live = [h for h in handles if not h.released]
                if op == "allocate":
                    try:
                        h = m.allocate(arg, timeout=0)
                    except MultiQueueError as e:  # PoolExhaustedError
                        assert "no free block" in str(e)
                        continue
                    handles.append(h)
                    refs[h.id] = 1
                    ever.append(h.id)
                elif op in ("release", "release twice") and handles:
                    h = handles[arg % len(handles)]
                    if h.released:
                        with pytest.raises(BufferReleasedError):
                            h.release()
                    else:
                        h.release()
                        refs[h.id] -= 1
                elif op in ("get", "share") and ever:
                    buffer_id = ever[arg % len(ever)]
                    if refs.get(buffer_id, 0) > 0:
                        if op == "get":
                            h = m.get(buffer_id)
                        else:
                            h = next(x for x in live if x.id == buffer_id).share()
                        handles.append(h)
                        refs[buffer_id] += 1
                        assert h.ref_count == refs[buffer_id]
                    else:
                        with pytest.raises(InvalidBufferError):
                            m.get(buffer_id)
                elif op == "push raw id" and ever:
                    with pytest.raises(TypeError):
                        q.push(ever[arg % len(ever)], timeout=0)
                elif op == "push released" and handles and handles[arg % len(handles)].released:
                    with pytest.raises(BufferReleasedError):
                        q.push(handles[arg % len(handles)], timeout=0)
                elif op == "get random" and refs.get(arg, 0) == 0:
                    with pytest.raises(InvalidBufferError):
                        m.get(arg)
            for h in handles:
                if not h.released:
                    h.release()
            assert reader.try_pop() is None  # nothing was ever pushed
            assert m.get_stats().total_allocated == 0

        check()
        reader.detach()
        report = diagnose(domain)
        assert report.ok, report.format()


def test_buffer_ids_are_refused_in_another_process(domain):
    """The same refusals from a separate interpreter attached by name (its ledger row and
    context are its own): stale, forged, out-of-range and negative ids."""
    with ShmManager(domain, SMALL, reaper_interval=None) as m:
        live = m.allocate(64)
        stale = m.allocate(64)
        stale_id = stale.id
        stale.release()
        ids = [stale_id, 0, 1, -1, 2**64, 2**64 - 1, (1 << 32) | 512, (1 << 32) | 0xFFFFFFFF,
               live.id + (1 << 32)]
        code = textwrap.dedent(r"""
            import json, sys
            from multiqueue import InvalidBufferError, ShmManager
            with ShmManager(sys.argv[1], create=False, reaper_interval=None) as m:
                out = []
                for i in json.loads(sys.argv[2]):
                    try:
                        m.get(i).release()
                        out.append("accepted")
                    except InvalidBufferError:
                        out.append("refused")
                with m.get(int(sys.argv[3])) as b:
                    out.append(b.ref_count)
                print(json.dumps(out))
            """)
        result = run_python(code, domain, json.dumps(ids), live.id)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["refused"] * len(ids) + [2]
        assert live.ref_count == 1
        live.release()
        assert diagnose(domain).ok
