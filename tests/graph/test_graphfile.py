"""Graph files (YAML) and `mq run`: every error names the file, line and key; a valid
file builds the graph it describes; `mq run` runs it, reports, and leaves nothing behind."""

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from multiqueue.errors import GraphFileError
from multiqueue.graph import Amplifier, NullSink, SignalSource, Spectrum
from multiqueue.graph.graphfile import load_graph, load_graph_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "graphs" / "sine.yaml"

# A chain that many cases below extend: src -> amp -> sink.
CHAIN = """\
blocks:
  src: {class: SignalSource, params: {count: 4}}
  amp: {class: Amplifier}
  sink: {class: NullSink}
connections:
  - src.out -> amp.in
  - amp.out -> sink.in
"""

# (text, line, key path, words of the reason): one per error class
ERRORS = {
    "yaml syntax": ("blocks:\n  src: {class: NullSource\n  sink: {class: NullSink}\n",
                    3, None, "YAML syntax error: expected ',' or '}'"),
    "empty file": ("", 1, None, "the file is empty"),
    "top level not a mapping": ("- src\n- sink\n", 1, None, "top level must be a mapping"),
    "unknown top-level key": (CHAIN + "conections: []\n", 8, "conections", "did you mean 'connections'"),
    "duplicate key": ("blocks:\n  src: {class: NullSource}\n  src: {class: NullSource}\n",
                      3, "blocks.src", "duplicate key"),
    "missing blocks": ("domain: x\ncapacity: 8\n", 1, "blocks", "missing"),
    "no blocks": ("blocks: {}\n", 1, "blocks", "no blocks"),
    "bad domain": ("domain: a b\n" + CHAIN, 1, "domain", "invalid domain name 'a b'"),
    "bad capacity": ("capacity: 10\n" + CHAIN, 1, "capacity", "power of two, not 10"),
    "block without class": ("blocks:\n  src:\n    params: {count: 4}\n", 3, "blocks.src.class", "missing"),
    "class not a string": ("blocks:\n  src: {class: [NullSource]}\n", 2, "blocks.src.class",
                           "expected a block class name, not a list"),
    "unknown built-in": ("blocks:\n  src: {class: SineSource}\n", 2, "blocks.src.class",
                         "unknown built-in block 'SineSource'; did you mean 'SignalSource'"),
    "module not importable": ("blocks:\n  src: {class: 'no_such_module_mq:Source'}\n", 2, "blocks.src.class",
                              "cannot import module 'no_such_module_mq'"),
    "attribute missing": ("blocks:\n  src: {class: multiqueue.graph.blocks.SineSource}\n", 2,
                          "blocks.src.class", "'multiqueue.graph.blocks' has no attribute 'SineSource'"),
    "not a block class": ("blocks:\n  src: {class: 'multiqueue.graph.block:Port'}\n", 2, "blocks.src.class",
                          "is not a Block subclass"),
    "not a class at all": ("blocks:\n  src: {class: 'numpy:pi'}\n", 2, "blocks.src.class",
                           "is not a Block subclass (it is a float)"),
    "params not a mapping": ("blocks:\n  src:\n    class: SignalSource\n    params: [4]\n", 4,
                             "blocks.src.params", "expected a mapping, not a list"),
    "unknown parameter": (CHAIN.replace("Amplifier}", "Amplifier, params: {gian: 2}}"), 3,
                          "blocks.amp.params.gian", "unknown parameter; did you mean 'gain'"),
    "missing parameter": ("blocks:\n  rec:\n    class: FileSink\n    params: {max_frames: 3}\n", 4,
                          "blocks.rec.params", "missing 'path'"),
    "constructor rejects a parameter": (
        "blocks:\n  src:\n    class: SignalSource\n    params:\n      rate: 48000\n      waveform: square\n",
        6, "blocks.src.params.waveform", "waveform must be 'sine', 'noise' or 'chirp'"),
    "constructor rejects the parameters": (
        "blocks:\n  src:\n    class: SignalSource\n    params: {rate: -1, frame: 0}\n", 4,
        "blocks.src.params", "SignalSource(...) raised ValueError: rate and frame must be positive"),
    "function block rejects a parameter": (
        "blocks:\n  src:\n    class: graph_blocks:ramp_gen\n    params: {cont: 3}\n", 4,
        "blocks.src.params.cont", "ramp_gen() has no parameter 'cont'"),
    "unknown block key": ("blocks:\n  src: {class: NullSource, placment: thread}\n", 2, "blocks.src.placment",
                          "unknown key; did you mean 'placement'"),
    "bad placement": ("blocks:\n  src:\n    class: NullSource\n    placement: 3\n", 4, "blocks.src.placement",
                      "expected 'process', 'thread' or a process name, not '3'"),
    "bad restart": ("blocks:\n  src: {class: NullSource, restart: always}\n", 2, "blocks.src.restart",
                    "expected 'stop' or 'restart', not 'always'"),
    "bad block name": ("blocks:\n  my-src: {class: NullSource}\n", 2, "blocks.my-src", "block name 'my-src'"),
    "unconnected input": ("blocks:\n  src: {class: NullSource}\n  sink: {class: NullSink}\n", 3,
                          "blocks.sink", "input 'in' is not connected"),
    "connections not a list": (CHAIN.split("connections:")[0] + "connections: src.out -> amp.in\n", 5,
                               "connections", "expected a list"),
    "malformed connection": (CHAIN.replace("amp.out -> sink.in", "amp.out => sink.in"), 7, "connections[1]",
                             "'amp.out => sink.in' is not 'block.port -> block.port'"),
    "malformed port": (CHAIN.replace("amp.out -> sink.in", "amp.out -> sink"), 7, "connections[1]",
                       "'sink' is not 'block.port'"),
    "unknown block": (CHAIN.replace("amp.out -> sink.in", "amp.out -> snk.in"), 7, "connections[1]",
                      "no block named 'snk'; blocks: src, amp, sink"),
    "unknown port": (CHAIN.replace("src.out -> amp.in", "src.output -> amp.in"), 6, "connections[0]",
                     "block 'src' (SignalSource) has no output port 'output'; its outputs: out"),
    "input as a source": (CHAIN.replace("src.out -> amp.in", "amp.in -> amp.in"), 6, "connections[0]",
                          "has no output port 'in'"),
    "connection missing 'to'": (CHAIN.replace("- amp.out -> sink.in", "- {from: amp.out}"), 7,
                                "connections[1].to", "missing"),
    "bad policy": (CHAIN.replace("- amp.out -> sink.in", "- {from: amp.out, to: sink.in, policy: newest}"), 7,
                   "connections[1].policy", "expected 'block' or 'drop_oldest', not 'newest'"),
    "bad edge capacity": (CHAIN.replace("amp.out -> sink.in", "{from: amp.out, to: sink.in, capacity: 0}"), 7,
                          "connections[1].capacity", "power of two, not 0"),
    "dtype mismatch": (CHAIN.replace("SignalSource, params: {count: 4}", "graph_blocks.Ints"), 6,
                       "connections[0]", "cannot connect src.out to amp.in: dtype int16 does not match"),
    "second writer": (CHAIN + "  - src.out -> sink.in\n", 8, "connections[2]",
                      "input sink.in already has a writer"),
    "cycle": ("blocks:\n  a: {class: Amplifier}\n  b: {class: Amplifier}\nconnections:\n"
              "  - a.out -> b.in\n  - b.out -> a.in\n", 6, "connections[1]", "would make a cycle"),
    "pools not a list": ("pools: {name: frames}\n" + CHAIN, 1, "pools", "expected a list of pools"),
    "bad pool value": ("pools:\n  - {name: frames, block_size: 4096, count: 4}\n"
                       "  - {name: big, block_size: -1, count: 4}\n" + CHAIN, 3, "pools[1]",
                       "block_size must be a positive int, not -1"),
    "pool key missing": ("pools:\n  - {name: frames, block_size: 4096}\n" + CHAIN, 2, "pools[0].count",
                         "missing"),
    "unknown pool key": ("pools:\n  - {name: frames, blocksize: 4096, count: 4}\n" + CHAIN, 2,
                         "pools[0].blocksize", "did you mean 'block_size'? allowed: name, block_size, count"),
    "duplicate pool names": ("pools:\n  - {name: f, block_size: 64, count: 4}\n"
                             "  - {name: f, block_size: 64, count: 4}\n" + CHAIN, 2, "pools",
                             "pool names must be unique"),
    "unsafe tag": ("blocks:\n  src: {class: !!python/name:os.system ''}\n", 2, "blocks.src.class",
                   "could not determine a constructor"),
}


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_graph_file_error_names_the_line_and_key(case):
    text, line, key, reason = ERRORS[case]
    with pytest.raises(GraphFileError) as info:
        load_graph_text(text, source="graph.yaml")
    e = info.value
    assert (e.line, e.key) == (line, key), str(e)
    assert str(e).startswith(f"graph.yaml:{line}: {key}: " if key else f"graph.yaml:{line}: "), str(e)
    assert reason in e.reason, str(e)


def test_a_valid_file_builds_the_runtime():
    rt = load_graph_text(textwrap.dedent("""\
        domain: demo-graph
        capacity: 32
        pools:
          - {name: frames, block_size: 4096, count: 64}
          - {name: big, block_size: 65536, count: 8, expandable: true, max_blocks: 32}
        blocks:
          src:
            class: SignalSource
            params: {waveform: noise, rate: 8000, frame: 256, count: 10, seed: 3}
          amp: {class: Amplifier, params: {gain: 0.25}, placement: dsp, restart: restart, max_restarts: 5}
          x3: {class: "graph_blocks:scale", params: {factor: 3.0}, placement: dsp}
          fft: {class: multiqueue.graph.blocks.Spectrum, params: {fft_size: 128}, placement: thread}
          sink: {class: NullSink}
        connections:
          - src.out -> amp.in
          - " amp.out->x3.in "
          - {from: x3.out, to: fft.in, policy: drop_oldest, capacity: 4}
          - {from: fft.out, to: sink.in}
        """), source="demo.yaml")
    assert rt.domain == "demo-graph" and rt.capacity == 32
    assert [(p.name, p.block_size, p.block_count, p.expandable, p.max_blocks) for p in rt.pools.pools] == [
        ("frames", 4096, 64, False, None), ("big", 65536, 8, True, 32)]
    assert list(rt.blocks) == ["src", "amp", "x3", "fft", "sink"]
    src, amp, x3, fft, sink = (rt.blocks[n] for n in rt.blocks)
    assert isinstance(src.block, SignalSource) and src.block.waveform == "noise" and src.block.count == 10
    assert isinstance(amp.block, Amplifier) and amp.block.gain == 0.25
    assert type(x3.block).__name__ == "scale" and x3.block.params == {"factor": 3.0}
    assert isinstance(fft.block, Spectrum) and fft.block.fft_size == 128
    assert isinstance(sink.block, NullSink)
    assert [(h.placement, h.restart, h.max_restarts) for h in rt.blocks.values()] == [
        ("process", "stop", 3), ("dsp", "restart", 5), ("dsp", "stop", 3), ("thread", "stop", 3),
        ("process", "stop", 3)]
    assert [(str(e.src), str(e.dst), e.policy, e.capacity) for e in rt.edges] == [
        ("src.out", "amp.in", "block", 32), ("amp.out", "x3.in", "block", 32),
        ("x3.out", "fft.in", "drop_oldest", 4), ("fft.out", "sink.in", "block", 32)]


def test_defaults_domain_from_the_file_name_and_merge_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "mq_graphfile_neighbour.py").write_text(textwrap.dedent("""\
        import numpy as np
        from multiqueue.graph import block

        @block(inputs={"in": np.float32}, outputs={"out": np.float32})
        def offset(frames, by=1.0):
            return [f + np.float32(by) for f in frames]
        """))
    path = tmp_path / "my_chain.yaml"
    path.write_text(textwrap.dedent("""\
        blocks:
          src: {class: NullSource, params: {count: 3}}
          add: &adder {class: "mq_graphfile_neighbour:offset", params: {by: 2.5}, placement: dsp}
          add2: {<<: *adder, params: {by: -1}}
          sink: {class: NullSink}
        connections: [src.out -> add.in, add.out -> add2.in, add2.out -> sink.in]
        """))
    rt = load_graph(path)
    assert rt.domain == "my_chain" and rt.pools is None and rt.capacity == 16
    assert rt.blocks["add"].block.params == {"by": 2.5}  # a module next to the graph file
    assert rt.blocks["add2"].block.params == {"by": -1} and rt.blocks["add2"].placement == "dsp"  # <<: merge
    assert rt.blocks["src"].block.count == 3
    assert load_graph(path, domain="other").domain == "other"


# -- mq run ---------------------------------------------------------------------------------


def mq_run(*args, cwd=ROOT, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiqueue.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_mq_run_runs_the_example_until_its_source_is_done(domain):
    result = mq_run(EXAMPLE, "--duration", 5, "--domain", domain)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"in domain {domain!r}: 5 blocks, 4 connections" in out
    # live progress: per block items and rate, per edge fill (and drops on drop_oldest edges)
    assert re.search(r"^\[\s*1\.0 s\] src \d+ \(\s*[\d.]+/s\)  amp \d+ .* count \d+ in ", out, re.M), out
    assert re.search(r"^ +fill: amp\.in \d+/16 .*spectrum\.in \d+/16 \(\d+ dropped\)", out, re.M), out
    assert "(the sources are done)" in out
    assert re.search(r"^src +done +0 +96 ", out, re.M) and re.search(r"^count +done +96 +0 ", out, re.M), out
    assert "pool blocks still in use after the stop: 0" in out


def test_mq_run_stops_after_the_duration(domain, tmp_path):
    path = tmp_path / "endless.yaml"
    path.write_text("blocks:\n  src: {class: SignalSource, params: {realtime: true, rate: 16384}}\n"
                    "  sink: {class: NullSink, placement: thread}\nconnections: [src.out -> sink.in]\n")
    result = mq_run(path, "--duration", 1, "--domain", domain, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "fill:" not in result.stdout  # --quiet: the summary only
    assert "(1 s passed)" in result.stdout
    received = int(re.search(r"^sink +\w+ +(\d+) ", result.stdout, re.M).group(1))
    assert 8 <= received <= 24, result.stdout  # 16 frames/s, paced
    assert "pool blocks still in use after the stop: 0" in result.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_mq_run_stops_in_order_on_ctrl_c_or_sigterm(domain, stop_signal):
    proc = subprocess.Popen([sys.executable, "-m", "multiqueue.cli", "run", str(EXAMPLE), "--domain", domain],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # the first progress line: the graph runs
        if line.startswith("["):
            break
    proc.send_signal(stop_signal)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping..." in out and "(interrupted)" in out
    assert "pool blocks still in use after the stop: 0" in out


def test_mq_run_reports_a_failed_block_and_exits_1(domain, tmp_path):
    (tmp_path / "mq_graphfile_failing.py").write_text(textwrap.dedent("""\
        import numpy as np
        from multiqueue.graph import block

        @block(inputs={"in": np.float32}, outputs={"out": np.float32})
        def explode(frames):
            raise RuntimeError("exploding on purpose")
        """))
    path = tmp_path / "failing.yaml"
    path.write_text("blocks:\n  src: {class: NullSource}\n  boom: {class: 'mq_graphfile_failing:explode'}\n"
                    "  sink: {class: NullSink}\nconnections: [src.out -> boom.in, boom.out -> sink.in]\n")
    result = mq_run(path, "--domain", domain)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "(a block failed)" in result.stdout
    assert "pool blocks still in use after the stop: 0" in result.stdout
    assert "block 'boom' failed (raised an exception)" in result.stderr
    assert "RuntimeError: exploding on purpose" in result.stderr


def test_mq_run_on_a_bad_file_exits_2_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(CHAIN.replace("{class: Amplifier}", "{class: Amplifier, params: {gian: 2}}"))
    result = mq_run(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:3: blocks.amp.params.gian: unknown parameter"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    missing = mq_run(tmp_path / "missing.yaml")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad_domain = mq_run(EXAMPLE, "--domain", "a b")
    assert bad_domain.returncode == 2 and "invalid domain name 'a b'" in bad_domain.stderr


def test_the_example_graph_is_documented():
    docs = (ROOT / "docs" / "graphs.md").read_text()
    assert "## Graph files" in docs and "examples/graphs/sine.yaml" in docs
