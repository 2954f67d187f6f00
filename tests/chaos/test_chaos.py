"""Chaos suite: a graph streams across processes while the test SIGKILLs its workers and
its external consumers at random moments, round after round.

The graph (every block in a worker process of its own; all edges lossless ``block``)::

    src (SeqSource, restart=stop) -+-> a_fwd  (Forward, restart)            -> a_sink (SeqSink, restart)
                                   +-> b_copy (Copy, restart, max_restarts=1) -> b_sink (SeqSink, restart)
                                   +-> c_fwd  (Forward, restart=stop)        -> c_sink (SeqSink, restart)

plus two external consumers (``chaos_consumer.py``, separate interpreters attaching by
domain name): ``tap_src`` reads ``src.out`` with policy ``block`` (it holds the source
back until it is reaped) and ``tap_b`` reads ``b_copy.out`` with ``drop_oldest``.
Frames carry sequence numbers (``chaos_blocks.py``), so every reader checks order,
contents and counts its losses.

Each round, with ``random.Random(seed)``: wait a random delay, SIGKILL a victim (a
restartable worker, a stop-policy worker or an external consumer) mid-stream, then wait
(polling with deadlines, never on timing) until:

- the survivors (branches and consumers not fed by the victim) advanced by ``ADVANCE``
  frames after the kill, and again after the runtime acted;
- the runtime restarted the worker (a new pid, ``restarts`` + 1, its branch streams
  again) when its policy says restart and its budget allows, or else stopped the graph
  (``wait()`` raises BlockError naming the block and SIGKILL; every other block drained
  and ended ``done``); a stopped graph is checked, then a new one is started on the same
  domain for the next rounds;
- a killed consumer's reader and process were reaped (so it no longer holds the
  producer back: the source pushed more than a ring's worth after the kill); a new
  consumer replaces it;
- ``multiqueue.tools.doctor.diagnose`` (in-process, every round) and ``mq doctor DOMAIN
  --json`` (the CLI, on random rounds and at the end) report nothing once the dead are
  reaped, and with the graph paused every pool block is accounted for: ``blocks_used``
  of each pool equals the blocks doctor sees held, and doctor's own per-pool
  accounting (free + held + unpublished == blocks) finds no lost block.

At the end the graph is stopped cleanly and the totals are checked: per sink
``received + lost == next expected`` and the next expected is the number of frames the
source sent (a branch that ran to the end saw the last frame), no duplicates or corrupt
frames anywhere, no loss at all on a branch nothing was killed in; the ``block``
consumer lost nothing after it joined; the ``drop_oldest`` one lost exactly what its
queue dropped for it (unless its producer was restarted under it); after the last
process left, every block of every pool is free and /dev/shm holds nothing of the domain.

A summary line (seed, rounds survived, kills by kind, leaks found) is printed at the end,
also when the test fails; a failure names the seed and round that reproduce it.

Options (registered in tests/conftest.py):

    --chaos-rounds N   rounds to run (default 10: the short form, in the normal test command)
    --chaos-seed S     the schedule's seed (default DEFAULT_SEED below)

The long form, e.g.: ``.venv/bin/python -m pytest tests/chaos --chaos-rounds 200 -s``.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chaos_blocks import Copy, Forward, SeqSink, SeqSource, unpack

from helpers import wait_until
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.control import Bus
from multiqueue.errors import BlockError
from multiqueue.graph import Runtime
from multiqueue.shm.segment import domain_segments
from multiqueue.tools.doctor import diagnose

DEFAULT_ROUNDS = 10
DEFAULT_SEED = 7140  # its 10 rounds kill every kind of victim and stop the graph 3 ways
PACE_S = 0.002  # the source's pace: about 500 frames/s at most
CAPACITY = 16  # every edge's ring (the Runtime default)
ADVANCE = 2 * CAPACITY + 8  # frames a stream must advance to count as "kept streaming"
WAIT_S = 60.0  # generous deadline of every wait (a 2-core machine shared with other tests)
POOLS = ShmConfig(pools=[PoolConfig("frames", 1024, 512)], max_processes=48)
HERE = Path(__file__).parent
CONSUMER_SCRIPT = HERE / "chaos_consumer.py"


@dataclass(frozen=True)
class BlockPlan:
    name: str
    make: type
    restart: str
    max_restarts: int
    branch: str | None  # None: the source, upstream of everything


PLAN = [
    BlockPlan("src", SeqSource, "stop", 0, None),
    BlockPlan("a_fwd", Forward, "restart", 100, "a"),
    BlockPlan("a_sink", SeqSink, "restart", 100, "a"),
    BlockPlan("b_copy", Copy, "restart", 1, "b"),  # a second kill in one graph run exhausts it: stop
    BlockPlan("b_sink", SeqSink, "restart", 100, "b"),
    BlockPlan("c_fwd", Forward, "stop", 0, "c"),
    BlockPlan("c_sink", SeqSink, "restart", 100, "c"),
]
BLOCKS = {p.name: p for p in PLAN}
SINKS = {"a": "a_sink", "b": "b_sink", "c": "c_sink"}
CONSUMERS = {"tap_src": ("src.out", "block"), "tap_b": ("b_copy.out", "drop_oldest")}
TAP_FEEDER = {"tap_src": "src", "tap_b": "b_copy"}  # the block whose output a consumer reads
VICTIM_KINDS = [("restartable worker", 5), ("consumer", 3), ("stop-policy worker", 2)]


# -- external consumers ----------------------------------------------------------------------


class Consumer:
    """A chaos_consumer.py process and what it reported (read by a thread)."""

    def __init__(self, name: str, domain: str, log_dir: Path, serial: int):
        self.name = name
        self.port, self.policy = CONSUMERS[name]
        self.stderr_path = log_dir / f"{name}-{serial}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CONSUMER_SCRIPT), domain, self.port, self.policy],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE)
        self.pid = self.proc.pid
        self.cond = threading.Condition()
        self.ready = False
        self.received = 0
        self.end: dict | None = None
        self.eof = False
        self.feeder_restarted = False  # the block it reads was killed and restarted under it
        self._thread = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.cond:
                if "ready" in message:
                    self.ready = True
                elif "n" in message:
                    self.received = message["n"]
                elif message.get("end"):
                    self.end = message
                    self.received = message["received"]
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = WAIT_S) -> None:
        with self.cond:
            self.cond.wait_for(lambda: predicate() or self.eof, timeout)
            if predicate():
                return
        raise AssertionError(f"consumer {self.name} (pid {self.pid}): timed out or ended waiting until "
                             f"{what}; stderr:\n{self.stderr()}")

    def finish(self) -> dict:
        """Its final report, once the graph stopped (it exits 0 on its own)."""
        self.wait_for(lambda: self.end is not None, "it reports its totals")
        assert self.proc.wait(timeout=WAIT_S) == 0, self.stderr()
        self._thread.join(WAIT_S)
        self.proc.stdout.close()
        return self.end

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=WAIT_S) == -signal.SIGKILL
        self._thread.join(WAIT_S)
        self.proc.stdout.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


# -- one graph run ---------------------------------------------------------------------------


def build_runtime(domain: str) -> Runtime:
    rt = Runtime(domain, pools=POOLS, capacity=CAPACITY, drain_timeout=30)
    for p in PLAN:
        rt.add(p.make(pace_s=PACE_S) if p.make is SeqSource else p.make(), name=p.name,
               restart=p.restart, max_restarts=p.max_restarts)
    for branch, sink in SINKS.items():
        middle = next(p.name for p in PLAN if p.branch == branch and p.name != sink)
        rt.connect(rt["src"]["out"], rt[middle]["in"])
        rt.connect(rt[middle]["out"], rt[sink]["in"])
    return rt


@dataclass
class Tally:
    """What happened, for the summary line."""

    seed: int
    rounds: int
    survived: int = 0
    graphs: int = 0
    kills: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    leaks: list = field(default_factory=list)
    cli_checks: int = 0

    def add(self, table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def line(self) -> str:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())) or "none"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "none"
        return (f"chaos: seed {self.seed}, rounds survived {self.survived}/{self.rounds}, graphs run "
                f"{self.graphs}; kills by kind: {kills}; outcomes: {outcomes}; mq doctor CLI checks "
                f"{self.cli_checks}; leaks found {len(self.leaks)}")


class GraphRun:
    """One Runtime on the domain, its consumers, and the driver's own attachment."""

    def __init__(self, domain: str, log_dir: Path, tally: Tally):
        self.domain, self.log_dir, self.tally = domain, log_dir, tally
        self.rt = build_runtime(domain)
        self.touched: set[str] = set()  # branches where a block was killed
        self.src_killed = False
        self.killed_pids: set[int] = set()  # workers killed in this run
        self.consumers: dict[str, Consumer] = {}
        self.retired: list[Consumer] = []
        self.serial = 0
        self.driver = self.bus = None
        try:
            self.rt.start()
            tally.graphs += 1
            # the driver's attachment: stats, the bus (pause/resume), and it keeps the domain
            # alive after the runtime's teardown so that the pools can be checked empty
            self.driver = ShmManager(domain, create=False, name="chaos-driver", reaper_interval=None)
            self.bus = Bus(self.driver)
            for name in CONSUMERS:
                self.start_consumer(name)
            self.wait_streaming(self.stream_names(), self.counts(), "the new graph streams")
        except BaseException:
            self.abandon()
            raise

    # -- observing

    def stats(self):
        return self.rt.stats()

    def counts(self) -> dict[str, int]:
        """Frames seen so far by every stream: sinks (received), consumers, and the source (sent)."""
        blocks = self.stats().blocks
        out = {"src": blocks["src"].counters["sent"]}
        for sink in SINKS.values():
            out[sink] = unpack(blocks[sink].counters["state"])[0]
        for name, c in self.consumers.items():
            out[name] = c.received
        return out

    def stream_names(self) -> list[str]:
        return [*SINKS.values(), *self.consumers]

    def wait_streaming(self, names, before: dict, what: str) -> None:
        """Until each stream in ``names`` advanced by ADVANCE frames since ``before``."""
        def advanced():
            now = self.counts()
            return all(now[n] >= before.get(n, 0) + ADVANCE for n in names)
        wait_until(advanced, f"{what}: {sorted(names)} each advance {ADVANCE} frames from {before}")

    # -- consumers

    def start_consumer(self, name: str) -> Consumer:
        self.serial += 1
        c = self.consumers[name] = Consumer(name, self.domain, self.log_dir, self.serial)
        c.wait_for(lambda: c.ready, "its tap has joined")
        return c

    # -- the doctor

    def wait_reaped(self, pids: set[int], what: str) -> None:
        """Until doctor shows no dead process or dead reader (and none of ``pids`` at all)."""
        def clean():
            report = diagnose(self.domain).to_json()
            dead = [f for f in report["findings"] if f["kind"] in ("dead-process", "dead-reader")]
            present = {p["pid"] for p in report["processes"]} | {
                r["pid"] for q in report["queues"] for r in q["readers"]}
            return not dead and not pids & present
        wait_until(clean, f"{what}: the dead are reaped")

    def pause(self, verb: str) -> None:
        for name in BLOCKS:
            answer = self.bus.request(f"ctl-{name}", {"cmd": verb}, timeout=WAIT_S).data
            assert answer.get("ok"), f"{verb} {name}: {answer}"

    def check_doctor(self, where: str, cli: bool) -> None:
        """No leak or inconsistency, and (paused) every pool block accounted for."""
        self.wait_reaped(set(), where)
        self.pause("pause")
        try:
            report, used = wait_until(self._quiet_snapshot, f"{where}: a quiet snapshot of the paused graph")
            report = report.to_json()
            problems = [f"{f['kind']}: {f['message']}" for f in report["findings"]]
            problems += self._accounting_problems(report, used)
            if cli:
                self.tally.cli_checks += 1
                problems += self._cli_doctor(used)
            if problems:
                self.tally.leaks.extend(f"{where}: {p}" for p in problems)
            assert not problems, f"{where}: mq doctor found problems:\n" + "\n".join(problems)
        finally:
            self.pause("resume")

    def _quiet_snapshot(self):
        """(report, blocks_used per pool) when nothing was allocated or freed around the report."""
        def mark():
            s = self.driver.get_stats()
            return s.allocation_count, s.deallocation_count, {p.name: p.blocks_used for p in s.pool_stats}
        before = mark()
        report = diagnose(self.domain)
        return (report, before[2]) if mark() == before else None

    @staticmethod
    def _accounting_problems(report: dict, used: dict[str, int]) -> list[str]:
        """blocks_used of each pool == blocks doctor sees held (and doctor's own pool accounting)."""
        held: dict[str, int] = {}
        for b in report["buffers"]:
            held[b["pool"]] = held.get(b["pool"], 0) + 1
        problems = [f"pool {name!r}: {n} blocks in use, doctor accounts for {held.get(name, 0)}"
                    for name, n in used.items() if held.get(name, 0) != n]
        problems += [f"doctor sees blocks of unknown pool {name!r}" for name in held if name not in used]
        pools = {pool["name"]: pool for pool in report["pools"]}  # doctor's own per-pool accounting
        if set(pools) != set(used):
            problems.append(f"doctor accounts for pools {sorted(pools)}, the domain has {sorted(used)}")
        for pool in pools.values():
            if pool["lost"]:
                problems.append(f"pool {pool['name']!r}: {pool['lost']} lost block(s)")
            if pool["held"] + pool["unpublished"] != used.get(pool["name"]):
                problems.append(f"pool {pool['name']!r}: doctor's pool accounting: {pool}, in use "
                                f"{used.get(pool['name'])}")
            placed = pool["held"] + pool["unpublished"] + (pool["free"] or 0)
            if pool["free"] is not None and placed != pool["blocks"]:
                problems.append(f"pool {pool['name']!r}: doctor's accounting does not add up: {pool}")
        return problems

    def _cli_doctor(self, used: dict[str, int]) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "multiqueue.cli", "doctor", self.domain, "--json"],
                              capture_output=True, text=True, timeout=WAIT_S)
        if done.returncode not in (0, 1):
            return [f"mq doctor --json exited {done.returncode}: {done.stdout[-4000:]}{done.stderr[-2000:]}"]
        report = json.loads(done.stdout)
        if report["findings"]:
            return [f"mq doctor --json: {f['kind']}: {f['message']}" for f in report["findings"]]
        if done.returncode != (1 if report["findings"] else 0) or report["ok"] != (not report["findings"]):
            return [f"mq doctor --json exited {done.returncode} with ok={report['ok']} and "
                    f"{len(report['findings'])} findings"]
        return self._accounting_problems(report, used)

    # -- the end of the graph

    def end(self, killed: str | None) -> None:
        """After the graph stopped (killed: the block whose death stopped it): consumers end,
        totals add up, every block of every pool is back, nothing is left in /dev/shm."""
        final = self.rt.final_stats.blocks
        sent = final["src"].counters["sent"]
        pushed = {sent, sent + 1} if self.src_killed else {sent}  # killed between push and count
        cut = set()  # branches that ended early: the killed block's
        if killed is not None and BLOCKS[killed].branch is not None:
            cut.add(BLOCKS[killed].branch)
        for branch, sink in SINKS.items():
            counters = final[sink].counters
            received, lost, expected = unpack(counters["state"])
            tag = f"{sink} (branch {branch}, {sent} sent): received {received}, lost {lost}, next {expected}"
            assert counters["dups"] == 0 and counters["corrupt"] == 0, f"{tag}; {counters}"
            assert received + lost == expected, tag
            if branch in cut:
                assert expected <= max(pushed), tag
            else:
                assert expected in pushed, f"{tag}: the branch did not see the last frame"
            if branch not in self.touched:
                assert lost == 0, f"{tag}: frames lost on a branch where nothing was killed"
        for name, c in list(self.consumers.items()):
            report = c.finish()
            tag = f"consumer {name} ({c.policy} on {c.port}): {report}"
            assert report["dups"] == 0 and report["corrupt"] == 0, tag
            feeder_cut = BLOCKS[TAP_FEEDER[name]].branch in cut  # its feeder ended early
            if report["last"] is not None and not feeder_cut:
                assert report["last"] + 1 in pushed, f"{tag}: it did not see the last frame"
            if c.policy == "block":
                assert report["lost"] == 0 and report["drops"] == 0, tag
            elif not c.feeder_restarted:
                assert report["lost"] == report["drops"], tag
            else:
                assert report["lost"] >= report["drops"], tag
        self.consumers.clear()
        self.bus.close()
        stats = self.driver.get_stats()
        diagnosis = diagnose(self.domain)
        report = diagnosis.to_json()
        assert not report["findings"], diagnosis.format()
        assert not report["buffers"], f"buffers held after every graph process left:\n{diagnosis.format()}"
        assert not [p for p in stats.pool_stats if p.blocks_used], (
            f"pool blocks still in use after every graph process left: {stats.pool_stats}")
        self.driver.shutdown()
        assert not domain_segments("mq.", self.domain), "the stopped graph left segments behind"

    def abandon(self) -> None:
        """After a failure: stop everything, kill what is left (the domain fixture cleans up)."""
        for c in [*self.consumers.values(), *self.retired]:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(WAIT_S)
        try:
            self.rt.stop(timeout=WAIT_S)
        except BlockError:
            pass
        try:
            if self.bus is not None:
                self.bus.close()
        finally:
            if self.driver is not None:
                self.driver.shutdown()


# -- the rounds ------------------------------------------------------------------------------


def kill_worker(run: GraphRun, victim: str, tally: Tally) -> bool:
    """SIGKILL a worker; check what the runtime did.  True if the graph goes on."""
    plan = BLOCKS[victim]
    row = run.stats().blocks[victim]
    assert row.state == "running" and row.pid > 0, f"victim {victim} is not running: {row}"
    restarts, failures = row.restarts, len(run.rt.failures)
    restart = plan.restart == "restart" and restarts < plan.max_restarts
    fed = {victim} if plan.branch is None else {victim, SINKS[plan.branch]}
    if plan.branch is None:  # the source feeds everything
        fed |= set(run.stream_names())
    fed |= {n for n in run.consumers if TAP_FEEDER[n] in fed}
    survivors = [n for n in run.stream_names() if n not in fed]
    before = run.counts()
    os.kill(row.pid, signal.SIGKILL)
    run.killed_pids.add(row.pid)
    if plan.branch is None:
        run.src_killed = True
    else:
        run.touched.add(plan.branch)
    if not restart:
        tally.add(tally.outcomes, "graph stopped")
        try:
            finished = run.rt.wait(timeout=WAIT_S)
        except BlockError as e:
            assert victim in str(e) and "SIGKILL" in str(e), str(e)
        else:
            raise AssertionError(f"killing {victim} (restart={plan.restart}, {restarts}/{plan.max_restarts} "
                                 f"restarts) did not stop the graph (wait returned {finished})")
        [failure] = run.rt.failures[failures:]
        assert failure.block == victim and failure.action == "stopped the graph", failure
        states = {name: b.state for name, b in run.rt.final_stats.blocks.items()}
        assert states == {name: "failed" if name == victim else "done" for name in BLOCKS}, states
        for b in run.rt.final_stats.blocks.values():  # every worker is gone
            with pytest.raises(ProcessLookupError):
                os.kill(b.pid, 0)
        run.end(victim)
        return False
    tally.add(tally.outcomes, "restarted")
    for c in run.consumers.values():
        if TAP_FEEDER[c.name] == victim:
            c.feeder_restarted = True
    run.wait_streaming(survivors, before, f"after killing {victim}, the survivors keep streaming")
    wait_until(lambda: len(run.rt.failures) > failures, f"the runtime notices {victim} died")
    [failure] = run.rt.failures[failures:]
    assert failure.block == victim and "SIGKILL" in failure.reason and failure.action == "restarted", failure

    def back():
        b = run.stats().blocks[victim]
        return b.state == "running" and b.pid not in (0, row.pid) and b.restarts == restarts + 1
    wait_until(back, f"{victim} runs again in a new worker")
    run.wait_streaming(run.stream_names(), run.counts(), f"after {victim} restarted, every stream goes on")
    run.wait_reaped({row.pid}, f"after killing {victim}")
    return True


def kill_consumer(run: GraphRun, name: str) -> None:
    c = run.consumers.pop(name)
    survivors = run.stream_names()
    before = run.counts()
    c.kill()
    run.retired.append(c)
    # survivors, and the source is not held back by the dead reader (a block-policy
    # reader that is never reaped would stop it within one ring of frames)
    run.wait_streaming(["src", *survivors], before, f"after killing consumer {name} the graph streams on")
    run.wait_reaped({c.pid}, f"after killing consumer {name}")
    run.start_consumer(name)


def test_chaos(domain, tmp_path, request, capsys):
    rounds = request.config.getoption("--chaos-rounds") or DEFAULT_ROUNDS
    seed = request.config.getoption("--chaos-seed")
    seed = DEFAULT_SEED if seed is None else seed
    rng = random.Random(seed)
    print(f"chaos seed {seed} ({rounds} rounds); rerun with --chaos-seed {seed} --chaos-rounds {rounds}")
    tally = Tally(seed, rounds)
    run = None
    round_no = 0
    try:
        run = GraphRun(domain, tmp_path, tally)
        for round_no in range(1, rounds + 1):
            kinds, weights = zip(*VICTIM_KINDS, strict=True)
            kind = rng.choices(kinds, weights)[0]
            if kind == "consumer":
                victim = rng.choice(sorted(CONSUMERS))
            else:
                policy = "restart" if kind == "restartable worker" else "stop"
                victim = rng.choice([p.name for p in PLAN if p.restart == policy])
            delay = rng.uniform(0.02, 0.4)
            cli = rng.random() < 0.3
            print(f"round {round_no}: kill {kind} {victim} after {delay:.3f} s")
            time.sleep(delay)  # the random moment of the kill: this is the schedule, not a wait
            tally.add(tally.kills, kind)
            if kind == "consumer":
                kill_consumer(run, victim)
                tally.add(tally.outcomes, "consumer replaced")
            elif not kill_worker(run, victim, tally):  # the graph stopped, checked: start another
                run = None
                if round_no < rounds:
                    run = GraphRun(domain, tmp_path, tally)
            if run is not None:
                run.check_doctor(f"round {round_no}", cli)
            tally.survived = round_no
        if run is not None:
            run.check_doctor("the end", cli=True)
            run.rt.stop(timeout=WAIT_S)  # clean: raises BlockError if anything had stopped it
            assert [f.action for f in run.rt.failures] == ["restarted"] * len(run.rt.failures)
            run.end(None)
            run = None
    except BaseException as e:
        e.add_note(f"chaos seed {seed}, round {round_no} of {rounds}: rerun with --chaos-seed {seed} "
                   f"--chaos-rounds {rounds}")
        raise
    finally:
        if run is not None:
            run.abandon()
        with capsys.disabled():
            print(f"\n{tally.line()}")
    assert tally.survived == rounds and not tally.leaks


# -- found by the chaos suite ----------------------------------------------------------------


def test_a_killed_workers_bus_readers_are_reaped_with_it(domain):
    """Its command topics (ctl-<block>, to-<block>) are queues only the dead worker had open:
    the runtime reaps their readers too, or they would pin every later command."""
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(SeqSource(pace_s=PACE_S), name="src")
    sink = rt.add(SeqSink(), name="sink", restart="restart")
    rt.connect(src["out"], sink["in"])
    rt.start()
    try:
        pid = rt.stats().blocks["sink"].pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: rt.stats().blocks["sink"].pid not in (0, pid), "the sink is restarted")
        # the runtime reclaims at once and its manager reaps every second: 5 s is plenty
        deadline = time.monotonic() + 5.0
        while True:
            report = diagnose(domain)
            dead = [f.message for f in report.findings if f.pid == pid]
            if not dead or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not dead, "\n".join(dead)
    finally:
        rt.stop(timeout=WAIT_S)
