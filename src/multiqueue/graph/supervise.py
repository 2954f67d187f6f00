"""The supervisor of a running graph: its workers, their failures, restarts and the stop.

How it behaves is in docs/graphs.md ("Supervision").
"""

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time

from ..errors import BlockError
from . import registry as R
from .host import Host, host_main
from .losses import close_books, end_dead_block, last_losses
from .plan import host_groups, worker_blocks
from .resources import GraphResources
from .runner import WorkerBlock
from .spec import GraphSpec
from .stats import BlockFailure

ABORT_GRACE_S = 2.0  # after an abort, processes get this long before SIGKILL
_log = logging.getLogger("mq.runtime")


class HostHandle:
    """The supervisor's side of one host: its process or thread, pipe and state."""

    def __init__(self, key: str, names: list[str], kind: str):
        self.key, self.names, self.kind = key, names, kind
        self.conn = None
        self.process = None
        self.thread = None
        self.ready: set[str] = set()
        self.failures: list[tuple[str, str]] = []  # (block, traceback)
        self.exit_message = False
        self.done = False
        self.handled = False  # a failure of this host was acted on (restart or stop)

    def launch(self, domain: str, prefix: str, workers: list[WorkerBlock]) -> None:
        """Start it: a spawned process (attaching to the domain by name) or a thread."""
        ours, theirs = multiprocessing.Pipe()
        self.conn = ours
        process_name = f"mq-{self.key.removeprefix('group:')}"
        if self.kind == "process":
            ctx = multiprocessing.get_context("spawn")
            self.process = ctx.Process(target=host_main, name=process_name, daemon=True,
                                       args=(domain, prefix, workers, theirs, process_name))
            self.process.start()
            theirs.close()
        else:
            serve = Host(domain, prefix, workers, theirs, process_name).serve
            self.thread = threading.Thread(target=serve, name=process_name, daemon=True)
            self.thread.start()

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except (OSError, BrokenPipeError):
            pass  # it is exiting; the sentinel tells the rest

    @property
    def waitables(self) -> list:
        objects = [] if self.conn is None or self.conn.closed else [self.conn]
        if self.process is not None:
            objects.append(self.process.sentinel)
        return objects

    def collect(self) -> int | None:
        """Its process ended (its sentinel fired): its exit code, and its pipes closed."""
        self.process.join(5.0)
        exitcode = self.process.exitcode
        self.process.close()  # its pipes and sentinel: no descriptor kept per run
        return exitcode


class Supervisor:
    """Runs a graph spec's workers in a domain: starts them, watches them, acts on
    failures (restart or stop), stops them in order and releases everything.

    ``failures``: the list it appends a BlockFailure to, one per failure; ``shared``:
    the domain, bus, graph segment and queues it runs the graph in."""

    def __init__(self, spec: GraphSpec, drain_timeout: float, failures: list[BlockFailure]):
        self.spec, self.drain_timeout, self.failures = spec, drain_timeout, failures
        self.state = "starting"  # then "running", "stopping", "stopped"
        self.shared = GraphResources(spec)
        self.hosts: dict[str, HostHandle] = {}
        self.fatal: BlockFailure | None = None  # the failure that stopped the graph
        self.lock = threading.RLock()
        self.all_ready = threading.Event()
        self.all_exited = threading.Event()
        self._stop_at: float | None = None
        self._abort_at: float | None = None
        self._thread: threading.Thread | None = None
        self._next_drops_check = 0.0
        # called with each event it publishes on the bus's "status" topic (failures,
        # restarts), in its own thread: `mq run` prints them as they happen
        self.listeners: list = []

    # -- start -----------------------------------------------------------------------------

    def start(self, description: dict, workers: dict[str, WorkerBlock], start_timeout: float | None) -> None:
        """Create the domain's graph segment and queues, launch every worker, wait for
        them to get ready, let them go; on any failure, undo it all and raise."""
        try:
            self.shared.open(description)
            for queue in self.shared.queues.values():  # a viewer never slows the graph
                queue.default_policy = "drop_oldest"  # (a reader that names no policy)
            for key, names in host_groups(self.spec).items():
                kind = "thread" if self.spec.blocks[names[0]].placement == "thread" else "process"
                self._launch(key, names, kind, [workers[n] for n in names])
            self._thread = threading.Thread(target=self._supervise, name="mq-supervisor", daemon=True)
            self._thread.start()
            if not self.all_ready.wait(start_timeout) or self.fatal is not None:
                raise BlockError(str(self.fatal) if self.fatal else
                                 f"blocks did not get ready within {start_timeout} s: "
                                 f"{sorted(self._not_ready())}")
        except BaseException:
            self.begin_stop(abort=True)
            self.all_exited.wait(self.drain_timeout + ABORT_GRACE_S + 1)
            self.teardown()
            raise
        with self.lock:
            if self._stop_at is not None:  # a failure began a stop meanwhile
                raise BlockError(str(self.fatal) if self.fatal else "the graph stopped while starting")
            self.state = "running"
            for host in list(self.hosts.values()):
                host.send(("start",))
        self._publish({"event": "started", "blocks": list(self.spec.blocks)})

    def _launch(self, key: str, names: list[str], kind: str, workers: list[WorkerBlock]) -> None:
        host = HostHandle(key, names, kind)
        host.launch(self.spec.domain, self.shared.manager.prefix, workers)
        with self.lock:
            self.hosts[key] = host

    def _not_ready(self) -> set[str]:
        with self.lock:
            ready = {n for h in self.hosts.values() for n in h.ready}
        return set(self.spec.blocks) - ready

    def host_done(self, block: str) -> bool:
        """Has the worker of ``block`` ended?"""
        return self.hosts[self.spec.blocks[block].host_key].done

    # -- watching ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            while not self.all_exited.is_set():
                self._supervise_once()
        except BaseException as e:  # a supervisor that dies would leave wait() and stop() hanging
            _log.exception("the supervisor failed; aborting the graph")
            if self.fatal is None:
                self.fatal = BlockFailure("(runtime)", f"the supervisor failed: {e!r}", None,
                                          "stopped the graph")
            self.kill_all()
            self.all_ready.set()
            self.all_exited.set()

    def _supervise_once(self) -> None:
        """Wait up to 0.1 s for a message or a worker's end and act on it; escalate a
        stop that takes too long; report new drops."""
        with self.lock:
            hosts = [h for h in self.hosts.values() if not h.done]
        waitables = [w for h in hosts for w in h.waitables]
        ready = multiprocessing.connection.wait(waitables, timeout=0.1) if waitables else []
        for host in hosts:
            if host.conn in ready:
                self._receive(host)
            if host.process is not None and host.process.sentinel in ready:
                while not host.conn.closed and host.conn.poll(0):  # what it said before it ended
                    self._receive(host)
                self._host_ended(host)
            elif host.kind == "thread" and host.exit_message and not host.done:
                host.thread.join()
                self._host_ended(host)
        self._escalate()
        if time.monotonic() >= self._next_drops_check:
            self._next_drops_check = time.monotonic() + 1.0
            with contextlib.suppress(Exception):  # best effort: the graph may be ending meanwhile
                if self.state == "running":
                    self.shared.publish_drops()
        with self.lock:
            if self.hosts and all(h.done for h in self.hosts.values()):
                self.all_exited.set()

    def _receive(self, host: HostHandle) -> None:
        try:
            message = host.conn.recv()
        except (EOFError, OSError):
            host.conn.close()
            if host.kind == "thread":
                host.exit_message = True
            return
        kind = message[0]
        if kind == "ready":
            host.ready.add(message[1])
            if not self._not_ready():
                self.all_ready.set()
        elif kind == "failed":
            host.failures.append((message[1], message[2]))
            if len(host.names) > 1 and not host.done:
                self._group_block_failed(host)
        elif kind == "exit":
            host.exit_message = True

    def _group_block_failed(self, host: HostHandle) -> None:
        """A block of a shared process failed while the others run on: act now, not
        when the process ends (it might not): restart the group, or stop the graph."""
        if self._restartable(host):
            host.process.kill()  # the group restarts when its sentinel fires
            return
        self._fail(host, "raised an exception", False)

    def _host_ended(self, host: HostHandle) -> None:
        exitcode = 0
        with self.lock:  # kill_all reads done and the pid under it
            host.done = True
            if host.process is not None:
                exitcode = host.collect()
        unfinished = host.process is not None and not host.exit_message  # died, or left early
        if not host.failures and not unfinished and exitcode == 0:
            return
        self.shared.reclaim()
        if host.process is not None:
            self._count_dead_lives(host)
        self._mark_failed_rows(host)
        if host.handled:
            return  # a failure of this group was already acted on
        if self._stop_at is not None and not host.failures and exitcode is not None and exitcode < 0:
            return  # killed by our own escalation while stopping
        if host.failures:
            reason = "raised an exception"
        elif exitcode == 0:
            reason = "its process exited without finishing its blocks"
        else:
            reason = exit_reason(exitcode)
        self._fail(host, reason, True)

    # -- failures and restarts ---------------------------------------------------------------

    def _restartable(self, host: HostHandle) -> bool:
        blocks = [self.spec.blocks[n] for n in host.names]
        with self.lock:
            return (self.state == "running" and self._stop_at is None
                    and all(b.restart == "restart" for b in blocks)
                    and all(self.shared.block_row(b.name)[R.RESTARTS] < b.max_restarts for b in blocks))

    def _count_dead_lives(self, host: HostHandle) -> None:
        """A dead worker's blocks could not count the end of their lives on their edges
        (what they received, what was lost with them): count it for them, before a
        restart (graph/losses.py)."""
        for name in host.names:
            try:
                end_dead_block(self.spec, name, self.shared.block_row(name), self.shared.graph.edge_rows,
                               self.shared.queues)
            except Exception:  # noqa: BLE001 - counts are not worth stopping the supervision for
                _log.exception("could not count the losses of block %s", name)

    def _mark_failed_rows(self, host: HostHandle) -> None:
        """A dead worker could not write its rows: whatever it left running failed."""
        for name in host.names:
            row = self.shared.block_row(name)
            if row[R.STATE] in (R.CREATED, R.INITIALIZING, R.READY, R.RUNNING, R.RESTARTING):
                row[R.STATE] = R.FAILED
                row[R.FAILURES] += 1

    def _fail(self, host: HostHandle, reason: str, ended: bool) -> None:
        """Record a failure of ``host`` and restart it (if it ended) or stop the graph."""
        host.handled = True
        tb = "\n".join(tb for _, tb in host.failures) or None
        restartable = ended and self._restartable(host)
        failed = [b for b, _ in host.failures] or host.names
        failure = BlockFailure(", ".join(dict.fromkeys(failed)), reason, tb,
                               "restarted" if restartable else "stopped the graph")
        self.failures.append(failure)
        _log.error("%s", failure)
        restart = int(self.shared.block_row(host.names[0])[R.RESTARTS]) + 1 if restartable else None
        max_restarts = self.spec.blocks[host.names[0]].max_restarts
        lost = last_losses(self.spec, host.names, self.shared.graph.edge_rows)
        self._publish({"event": "failed", "blocks": host.names, "reason": reason, "action": failure.action,
                       "restart": restart, "max_restarts": max_restarts, "lost": lost, "traceback": tb,
                       "message": failure_message(failure, restart, max_restarts, lost)}, topic="errors")
        if restartable:
            self._restart(host)
            return
        if self.fatal is None:
            self.fatal = failure
            self.all_ready.set()  # a start() waiting for this host: stop waiting
        self.shared.close_outputs(failed)  # let everything downstream drain and end
        self.begin_stop()

    def _restart(self, host: HostHandle) -> None:
        workers = worker_blocks(self.spec)
        for name in host.names:
            row = self.shared.block_row(name)
            row[R.RESTARTS] += 1
            row[R.STATE] = R.RESTARTING  # until its new worker takes the row (initializing)
            workers[name].start = "latest"
        self._launch(host.key, host.names, host.kind, [workers[n] for n in host.names])
        with self.lock:  # a stop meanwhile did not know this host: tell it now
            self.hosts[host.key].send(("start",) if self._stop_at is None else ("stop",))
        pids = [self.hosts[host.key].process.pid] if host.kind == "process" else []
        self._publish({"event": "restarted", "blocks": host.names, "pids": pids,
                       "restarts": int(self.shared.block_row(host.names[0])[R.RESTARTS]),
                       "message": f"block {', '.join(map(repr, host.names))} restarted"
                                  + (f" in process {pids[0]}" if pids else "")})

    def _publish(self, event: dict, topic: str = "status") -> None:
        """An event to the listeners, then on the bus (topic "status", and ``topic``)."""
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must not stop the supervision
                _log.warning("an event listener failed", exc_info=True)
        self.shared.status(event, topic)

    # -- stopping ----------------------------------------------------------------------------

    def begin_stop(self, abort: bool = False) -> None:
        """Tell every worker to stop (sources end, the rest drains); ``abort``: now."""
        with self.lock:
            if self.state == "stopped":
                return
            if self._stop_at is None:
                self._stop_at = time.monotonic()
                self.state = "stopping"
                for host in self.hosts.values():
                    host.send(("stop",))
            if abort and self._abort_at is None:
                self._abort_at = time.monotonic()
                self._abort_all()
        if not self.hosts:
            self.all_exited.set()

    def stop(self, timeout: float | None) -> None:
        """Stop in order, kill what still runs after ``timeout`` s, release everything."""
        if self.state == "stopped":
            return
        self.begin_stop()
        if not self.all_exited.wait(timeout):
            self.kill_all()
        self.teardown()

    def _escalate(self) -> None:
        """Drain timeout passed: abort; abort grace passed: kill."""
        now = time.monotonic()
        if self._stop_at is not None and self._abort_at is None and now - self._stop_at > self.drain_timeout:
            self._abort_at = now
            self._abort_all()
        if self._abort_at is None or now - self._abort_at <= ABORT_GRACE_S:
            return
        for host in self.hosts.values():
            if host.done:
                continue
            if host.process is not None and host.process.is_alive():
                host.process.kill()
            elif host.thread is not None:
                # a thread cannot be killed: give up on it (a daemon) so stop() returns
                host.done = True
                self.failures.append(BlockFailure(", ".join(host.names), "did not stop when aborted",
                                                  None, "left running in a daemon thread"))

    def kill_all(self) -> None:
        """Abort, then SIGKILL, every worker still running.  Signals only: the supervisor
        alone waits for processes (two threads reaping one child race), so from another
        thread this waits for the supervisor to see them end."""
        self._abort_all()
        in_supervisor = threading.current_thread() is self._thread
        if not in_supervisor and self.all_exited.wait(ABORT_GRACE_S):
            return
        with self.lock:  # the supervisor marks hosts done (and closes them) under it too
            pids = []
            for host in self.hosts.values():
                if host.process is not None and not host.done:
                    with contextlib.suppress(ValueError):  # closed meanwhile
                        pids.append(host.process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not in_supervisor:
            self.all_exited.wait(5.0)

    def _abort_all(self) -> None:
        for host in self.hosts.values():
            host.send(("abort",))
        self.shared.close_queues()

    def teardown(self) -> None:
        """Once the workers are gone: close their pipes, release the shared resources."""
        with self.lock:
            if self.state == "stopped":
                return
            self.state = "stopped"
        self.all_exited.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for host in self.hosts.values():
            if host.conn is not None:
                host.conn.close()
            if host.process is not None and not host.done:
                with contextlib.suppress(ValueError):
                    host.process.join(5.0)
                    host.process.close()
        if self.shared.graph is not None:  # what was sent to consumers that had ended: dropped
            close_books(self.spec, self.shared.graph.edge_rows, self.shared.queues)
        self.shared.release(self.failures)

    def raise_fatal(self) -> None:
        if self.fatal is not None:
            raise BlockError(str(self.fatal))


def failure_message(failure: BlockFailure, restart: int | None, max_restarts: int, lost: dict) -> str:
    """One line for a person: which block failed, why, what the runtime did, what was lost."""
    action = f"restarted it (restart {restart} of {max_restarts})" if restart else failure.action
    text = f"block {failure.block!r} failed ({failure.reason}); {action}"
    if lost:
        text += "; frames it held or had not read, counted as drops: " + \
            ", ".join(f"{n} on {edge}" for edge, n in lost.items())
    return text


def exit_reason(exitcode: int | None) -> str:
    """Why a worker process ended, from its exit code, in words."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"its process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"its process was killed by signal {-exitcode}"
    return f"its process exited with code {exitcode}"
