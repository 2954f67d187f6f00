"""The harness every benchmark script runs in.

A script's main:

    args = parser.parse_args()            # add_json_option(parser, "transport"): --json [PATH]
    h = Harness("transport", shm_prefixes=[f"mq.tb{os.getpid()}-"])  # prints the machine
    with h:                               # SIGTERM is Ctrl-C; h.workdir; Ctrl-C ends the block
        for ...:                          # quietly, then what the run left is removed
            h.measure("64 B 1->1 multiqueue", fn, *fn_args, brief=...)  # failures -> h.errors
    report(...)                           # its tables; print_errors(h.errors)
    h.finish(args.json, {...})            # elapsed, /dev/shm, the JSON; exit 130 if interrupted

and in the worker processes: ``@worker`` (SIGTERM ends it through its finally clauses,
the domains it ``attach``-ed are left), or ``ignore_ctrl_c()`` / ``exit_on_sigterm()``.
Also here: ``Session`` / ``Worker`` (spawned processes and the parent's end of their pipe),
run statistics (``median``, ``spread``, ``p50_p99_us``, ``time_round_trips``), the
formats the tables share, and ``verdict`` / ``print_verdicts`` for targets.
"""

import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

import multiqueue
from multiqueue import ShmManager

clock = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process of the machine
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KiB, MiB = 1024, 1024 * 1024


# -- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "multiqueue": multiqueue.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def print_machine(info: dict) -> None:
    print(f"CPU: {info['cpu']} ({info['cores']} cores), {info['platform']}")
    print(f"Python {info['python']}, numpy {info['numpy']}, multiqueue {info['multiqueue']}, "
          f"{info['date']}")


# -- command line and results ----------------------------------------------------------------


def add_json_option(parser, name: str, what: str = "the results") -> None:
    """``--json [PATH]``: write ``what`` as JSON to PATH, or with no PATH to
    benchmarks/results/NAME.json (the latest run of each script is kept there, in git)."""
    parser.add_argument("--json", metavar="PATH", nargs="?", const=os.path.join(RESULTS_DIR, f"{name}.json"),
                        help=f"write {what} as JSON to PATH (--json alone: benchmarks/results/{name}.json)")


def add_message_options(parser) -> None:
    """The options of the scripts that time messages between two processes (transport, bus):
    runs, throughput run length, round trips."""
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per throughput run (default 1)")
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds of the unmeasured first run")
    parser.add_argument("--max-messages", type=int, default=2_000_000, help="messages per run at most")
    parser.add_argument("--round-trips", type=int, default=20_000,
                        help="round trips per run (default 20,000)")


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


# -- the run ---------------------------------------------------------------------------------


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


class Harness:
    """One run of a benchmark script: the machine it runs on, a work directory, the errors
    of the parts that failed, SIGTERM taken as Ctrl-C, and what the run leaves in /dev/shm.

    ``shm_prefixes``: names in /dev/shm this run makes (its domains); any left at the end
    is removed and reported as a leftover (a bug).  ``extra``: versions of the peers
    compared, added to the machine description before it is printed."""

    def __init__(self, name: str, shm_prefixes=(), **extra):
        self.name = name
        self.shm_prefixes = list(shm_prefixes)
        self.also_remove: list[str] = []  # /dev/shm prefixes removed at the end, not reported
        self.info = {**machine_info(), **extra}
        self.errors: list[str] = []
        self.workdir = ""
        self.leftovers: list[str] = []
        self.interrupted = False
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._tags = itertools.count()
        print_machine(self.info)

    def __enter__(self) -> "Harness":
        signal.signal(signal.SIGTERM, _interrupt)  # kill PID cleans up like Ctrl-C
        self.workdir = tempfile.mkdtemp(prefix=f"{self.name}-bench-{os.getpid()}-")
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is KeyboardInterrupt:
            self.interrupted = True
            print("\ninterrupted: cleaning up", flush=True)
        self.leftovers = remove_leftovers(self.shm_prefixes, self.workdir, self.also_remove)
        self.elapsed = time.monotonic() - self.started
        return exc_type is KeyboardInterrupt

    def tag(self) -> str:
        """A new short name for a part of the run (its domain, its files)."""
        return str(next(self._tags))

    def measure(self, what: str, fn, *args, brief=None):
        """``fn(*args)``; if it raises, the error is recorded as ``what``'s and None returned
        (one part failing must not lose the others' figures).  ``brief(result)``: the line
        printed after it, followed by how long it took."""
        t = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:
            self.errors.append(f"{what}: {type(e).__name__}: {e}")
            print(f"  ERROR {what}: {e}", flush=True)
            return None
        if brief is not None:
            print(f"  {brief(result)}  ({time.monotonic() - t:.1f} s)", flush=True)
        return result

    def print_end(self, extra: str = "") -> None:
        left = "clean" if not self.leftovers else "removed leftovers " + ", ".join(self.leftovers)
        print(f"\nelapsed {self.elapsed:.0f} s; /dev/shm after the run: {left}{extra}")

    def write_json(self, path: str, payload: dict) -> None:
        """``payload`` between the run's description and its errors, leftovers and duration."""
        write_json(path, {"benchmark": self.name, "machine": self.info, **payload, "errors": self.errors,
                          "leftovers_in_dev_shm": self.leftovers, "elapsed_s": self.elapsed})

    def finish(self, json_path: str | None, payload=None, extra: str = "") -> None:
        """The end line, the JSON (``payload``: a dict, or a function returning it, called
        only if there is a path), and exit status 130 if the run was interrupted."""
        self.print_end(extra)
        if json_path:
            self.write_json(json_path, payload() if callable(payload) else payload)
        if self.interrupted:
            sys.exit(130)


def remove_leftovers(prefixes, workdir: str, also_remove=()) -> list[str]:
    """Remove what a run left: /dev/shm files starting with one of ``prefixes`` (a bug if
    any: they are returned, to report) or of ``also_remove`` (expected: not returned), and
    its temporary directory."""
    prefixes, also_remove = tuple(prefixes), tuple(also_remove)
    names = [n for n in os.listdir("/dev/shm") if n.startswith(prefixes + also_remove)]
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", name))
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return [n for n in names if n.startswith(prefixes)] if prefixes else []


def remove_domains(*domains: str) -> None:
    """Remove domains a killed worker may have left behind."""
    for domain in domains:
        with contextlib.suppress(Exception):
            ShmManager.cleanup(domain)


# -- worker processes ------------------------------------------------------------------------


def exit_on_sigterm(code: int = 143) -> None:
    """SIGTERM -> SystemExit(code), so the finally clauses run (a manager leaves its domain,
    a Runtime stops in order); a second SIGTERM does not interrupt them."""
    def on_term(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(code)

    signal.signal(signal.SIGTERM, on_term)


def ignore_ctrl_c() -> None:
    """Ctrl-C (which the terminal sends to every process of the group) is the parent's
    business: it stops the run in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_ATTACHED: dict[tuple, ShmManager] = {}


def attach(domain: str, name: str, *, reuse: bool = True) -> ShmManager:
    """A manager of ``domain`` (made by the parent) in this worker process, shut down when
    the ``@worker`` function ends; ``reuse``: the one this process already has."""
    key = (domain,) if reuse else (domain, len(_ATTACHED))
    m = _ATTACHED.get(key)
    if m is None:
        m = _ATTACHED[key] = ShmManager(domain, create=False, reaper_interval=None, name=name)
    return m


def worker(fn):
    """A spawned worker's function: SIGTERM -> SystemExit so its finally clauses run, quiet
    on Ctrl-C, and the managers it attached shut down at the end."""
    @functools.wraps(fn)
    def run(*args):
        exit_on_sigterm()
        try:
            fn(*args)
        except KeyboardInterrupt:
            pass
        finally:
            for m in _ATTACHED.values():
                with contextlib.suppress(Exception):
                    m.shutdown()
    return run


class Worker:
    """A spawned worker process and the parent's end of its pipe (the worker target gets
    the child end as its last argument).  ``daemon=False`` for a worker that starts
    processes of its own (a Runtime's block workers)."""

    def __init__(self, ctx, target, *args, name: str | None = None, daemon: bool = True):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(*args, child), daemon=daemon, name=name)
        self.name = self.process.name
        self.process.start()
        child.close()

    def send(self, message) -> None:
        self.conn.send(message)

    def expect(self, timeout: float = 120.0):
        """The worker's next message; RuntimeError if it dies or stays silent."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if not self.process.is_alive() and not self.conn.poll(0):  # a last word may still wait
                raise RuntimeError(f"worker {self.name} exited ({self.process.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} silent for {timeout:.0f} s")
        return self.conn.recv()

    def stop(self) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: the worker leaves its domain
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class Session:
    """Workers and what they use (``resource``: a transport, a hub, with a ``close()``;
    ``domains``: removed at the end in case a worker was killed), torn down in reverse
    whatever happens; on Ctrl-C every worker gets SIGTERM at once (they stop in order)."""

    def __init__(self, ctx, resource=None, domains=()):
        self.ctx, self.resource, self.domains = ctx, resource, domains
        self.workers: list[Worker] = []

    def start(self, target, *args, name: str | None = None, daemon: bool = True) -> Worker:
        worker = Worker(self.ctx, target, *args, name=name, daemon=daemon)
        self.workers.append(worker)
        return worker

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    worker.process.terminate()
        try:
            for worker in self.workers:
                worker.stop()
        finally:
            if self.resource is not None:
                self.resource.close()
            remove_domains(*self.domains)


# -- run statistics --------------------------------------------------------------------------


def median(values):
    """The median of the values that are not None; None if there are none."""
    values = [v for v in values or () if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> dict:
    """Median, min and max of per-run figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def p50_p99_us(ns) -> tuple[float, float]:
    """p50 and p99 of durations in ns, in microseconds."""
    p50, p99 = np.percentile(ns, [50, 99]) / 1e3
    return float(p50), float(p99)


def time_round_trips(send, recv, warmup: int, count: int, make=None, seq_of=None):
    """Round trip i: ``send(make(i))`` then ``recv()``, timed (perf_counter), after ``warmup``
    untimed ones; -> (p50 us, p99 us, replies whose ``seq_of(reply)`` is not i)."""
    now = time.perf_counter_ns
    times = np.empty(count, np.int64)
    bad = 0
    for i in range(warmup + count):
        value = i if make is None else make(i)
        t0 = now()
        send(value)
        got = recv()
        t1 = now()
        if (got if seq_of is None else seq_of(got)) != i:
            bad += 1
        if i >= warmup:
            times[i - warmup] = t1 - t0
    return (*p50_p99_us(times), bad)


# -- tables ----------------------------------------------------------------------------------


def print_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.3f} M" if x >= 1e6 else f"{x / 1e3:.1f} k" if x >= 1e3 else f"{x:.0f}"


def fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}"


def fmt_ratio(a: float | None, b: float | None, spec: str = ".2f") -> str:
    return "-" if not a or not b else f"{a / b:{spec}}x"


def fmt_size(size: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "PASS" if ok else "FAIL"


def target(ok: bool | None, text: str) -> dict:
    """One line of a script's targets (or verdicts): judged ``ok`` (None: not judged)."""
    return {"verdict": verdict(ok), "ok": ok, "text": text}


def print_verdicts(lines: list[dict], title: str = "Targets:") -> None:
    print(f"\n{title}")
    for line in lines:
        print(f"  {line['verdict']:<4} {line['text']}")


def print_errors(errors: list[str]) -> None:
    if errors:
        print("\nErrors:")
        for e in errors:
            print(f"  {e}")
