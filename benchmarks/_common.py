"""Helpers shared by the benchmark scripts: machine info, run statistics, table, JSON."""

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import time

import numpy as np

import multiqueue


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


def summarize(name: str, rates: list[float], target: float | None, reference: float) -> dict:
    """One result row: per-run rates (operations/s) -> median/min/max, ns per operation."""
    median = statistics.median(rates)
    return {
        "name": name,
        "runs": rates,
        "median": median,
        "min": min(rates),
        "max": max(rates),
        "ns_per_op": 1e9 / median,
        "target": target,
        "target_met": None if target is None else median >= target,
        "vs_reference": median / reference,
    }


def print_table(rows: list[dict], reference_label: str) -> None:
    header = (f"{'scenario':<40} {'median/s':>11} {'min/s':>11} {'max/s':>11} "
              f"{'ns/pair':>8} {reference_label:>8} {'target':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        verdict = "-" if r["target_met"] is None else ("PASS" if r["target_met"] else "FAIL")
        print(f"{r['name']:<40} {r['median']:>11,.0f} {r['min']:>11,.0f} {r['max']:>11,.0f} "
              f"{r['ns_per_op']:>8.0f} {r['vs_reference']:>7.2f}x {verdict:>6}")


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


class Worker:
    """A spawned worker process and the parent's end of its pipe (the worker target gets
    the child end as its last argument)."""

    def __init__(self, ctx, target, *args, name: str | None = None):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(*args, child), daemon=True, name=name)
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
    """A resource the workers use (a transport, a hub) and the workers, torn down in
    reverse whatever happens."""

    def __init__(self, ctx, resource):
        self.ctx, self.resource = ctx, resource
        self.workers: list[Worker] = []

    def start(self, target, *args) -> Worker:
        worker = Worker(self.ctx, target, *args)
        self.workers.append(worker)
        return worker

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for worker in self.workers:
                worker.stop()
        finally:
            self.resource.close()


def remove_leftovers(shm_prefix: str, workdir: str) -> list[str]:
    """Remove what a run left: /dev/shm files starting with ``shm_prefix`` (a bug if
    any: they are returned, to report) and its temporary directory."""
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix)]
    for name in leftovers:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", name))
    shutil.rmtree(workdir, ignore_errors=True)
    return leftovers
