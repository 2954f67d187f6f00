"""Helpers for tests that run other interpreters (import as `from helpers import ...`)."""

import json
import queue
import subprocess
import sys
import threading
import time

ROLE_WAIT = 60.0  # seconds a role may stay silent before the test fails (a hang, not a slow machine)


def run_python(code: str, *args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a separate interpreter (attaching by domain name like any process)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def spawn_python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def wait_until(condition, what: str, timeout: float = 60.0, interval: float = 0.005):
    """Poll ``condition`` until it returns something true, and return that (for states
    of other processes that no event announces, such as a block's counters)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        time.sleep(interval)
    return value


class RoleProcess:
    """A role script in another interpreter that reports on stdout as JSON lines with an
    "event"; the reports arrive on a queue (no polling), other lines in ``other_output``."""

    def __init__(self, name: str, command: list[str], **popen):
        self.name = name
        popen.setdefault("stdin", subprocess.PIPE)
        self.proc = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     **popen)
        self._lines: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self.other_output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self._stderr_thread = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr),
                                               daemon=True)
        self._stderr_thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                report = None
            if isinstance(report, dict) and "event" in report:
                self._lines.put(report)
            else:
                self.other_output.append(line)
        self._lines.put(None)  # end of output: the process exited

    def expect(self, event: str, timeout: float = ROLE_WAIT) -> dict:
        """The next report, which must be ``event``."""
        try:
            report = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"role {self.name} silent for {timeout} s waiting for {event!r}: "
                                 f"{self.stderr}") from None
        if report is None:
            self.proc.wait(timeout=ROLE_WAIT)
            self._stderr_thread.join(ROLE_WAIT)
            raise AssertionError(f"role {self.name} exited ({self.proc.returncode}) waiting for "
                                 f"{event!r}: {self.stderr}")
        assert report["event"] == event, f"{self.name}: {report}\n{self.stderr}"
        return report

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    @property
    def stderr(self) -> str:
        self._stderr_thread.join(0.5 if self.proc.poll() is not None else 0)
        return "".join(self._stderr)

    def finish(self) -> int:
        """The exit code of a role that is leaving, once it exited and every process that
        shares its stderr (its workers, multiprocessing's resource tracker) closed it."""
        code = self.proc.wait(timeout=ROLE_WAIT)
        self._stderr_thread.join(ROLE_WAIT)
        assert not self._stderr_thread.is_alive(), f"{self.name}: its stderr stays open after it exited"
        return code


class Lines:
    """The lines of a stream as they come, read on a thread (to wait on with a timeout)."""

    def __init__(self, stream):
        self.queue: queue.Queue = queue.Queue()
        self.all: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        with stream:
            for line in stream:
                self.all.append(line)
                self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the stream ended without {text!r}: {''.join(self.all)!r}")
            if text in line:
                return line

    def text(self) -> str:
        """Everything the stream carried (call once the process has ended)."""
        self.thread.join(30)
        return "".join(self.all)
