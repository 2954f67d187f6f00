"""One log per domain, shared by all its processes: ``<log dir>/<domain>.log``.

Each line is one ``write()`` on an O_APPEND file (lines never interleave), rotated
under an flock; ``DomainLogHandler`` plugs it into ``logging``. See docs/control.md,
"Logging".
"""

import contextlib
import datetime
import fcntl
import logging
import os
import re
import sys
import tempfile
import threading
import time

from ..checks import check_int
from ..shm.segment import check_domain

MAX_BYTES = 10 * 2**20
BACKUPS = 3
_block = threading.local()  # the block a thread runs, for the "block=" field
# a line as DomainLogHandler.format_line writes it (parse_line reads it back)
_LINE = re.compile(r"^(\S+) (\S+) +pid=(\d+) process=(.*?) block=(\S+) ([^ :]+): (.*)$")


def log_dir() -> str:
    return os.environ.get("MQ_LOG_DIR") or os.path.join(tempfile.gettempdir(), "multiqueue-logs")


def log_path(domain: str) -> str:
    """``<log dir>/<domain>.log``; ValueError for an invalid domain name (check_domain: so
    that no name can make a path outside the log directory)."""
    return os.path.join(log_dir(), f"{check_domain(domain)}.log")


def set_block(name: str | None) -> None:
    """Name the block this thread runs (the runner does it for every block thread)."""
    _block.name = name


class DomainLogHandler(logging.Handler):
    """A logging handler appending to the domain's log (any number of processes).

    ``domain``: a valid domain name (ValueError otherwise); ``max_bytes`` (>= 1): the
    size past which the file rotates; ``backups`` (>= 0): the rotated files kept,
    ``.1`` ... ``.<backups>`` (``.1`` at least); ``process_name``: the ``process=``
    field (default: the program name).
    """

    def __init__(self, domain: str, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 process_name: str | None = None, level=logging.NOTSET):
        path = log_path(domain)  # checks the name before anything is made from it
        self.max_bytes = check_int("max_bytes", max_bytes, 1)
        self.backups = check_int("backups", backups, 0)
        if process_name is not None and not isinstance(process_name, str):
            raise TypeError(f"process_name must be None or a str, not {type(process_name).__name__}")
        super().__init__(level)
        self.domain, self.path = domain, path
        self.process_name = process_name or os.path.basename(sys.argv[0] or "python")
        self._fd = -1
        self._ino = None
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)

    def format_line(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created).isoformat(timespec="microseconds")
        block = getattr(record, "block", None) or getattr(_block, "name", None) or "-"
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return (f"{when} {record.levelname:<7} pid={record.process} process={self.process_name} "
                f"block={block} {record.name}: {text}")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format_line(record) + "\n").encode("utf-8", "replace")
            with self.lock:
                self._write(data)
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        if self._fd < 0 or self._replaced():
            self._reopen()
        if os.fstat(self._fd).st_size + len(data) > self.max_bytes:
            self._rotate()
        os.write(self._fd, data)  # O_APPEND: the whole line lands at the end, in one piece

    def _replaced(self) -> bool:
        try:
            return os.stat(self.path).st_ino != self._ino
        except FileNotFoundError:
            return True

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._ino = os.fstat(self._fd).st_ino

    def _rotate(self) -> None:
        """Shift the files under an flock; whoever comes second finds it done."""
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._replaced() and os.fstat(self._fd).st_size > 0:
                for i in range(self.backups - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                os.replace(self.path, f"{self.path}.1")
            self._reopen()

    def close(self) -> None:
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


def domain_logger(domain: str, name: str = "mq", *, process_name: str | None = None,
                  level=logging.INFO) -> logging.Logger:
    """The logger ``name`` with this process's handler for ``domain`` (added once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, DomainLogHandler) and h.domain == domain for h in logger.handlers):
        logger.addHandler(DomainLogHandler(domain, process_name=process_name))
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return logger


def remove_domain_handlers(domain: str, name: str = "mq") -> None:
    logger = logging.getLogger(name)
    for h in [h for h in logger.handlers if isinstance(h, DomainLogHandler) and h.domain == domain]:
        logger.removeHandler(h)
        h.close()


def read_lines(domain: str, count: int | None = None) -> list[str]:
    """The last ``count`` lines of the domain's log (all of them for None)."""
    try:
        with open(log_path(domain), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return lines if count is None else lines[-count:] if count else []


def parse_line(line: str) -> dict:
    """A line of the log as data, the fields ``format_line`` writes (time, level, pid,
    process, block, logger, message); a line of another shape as ``{"text": line}``."""
    match = _LINE.match(line)
    if match is None:
        return {"text": line}
    when, level, pid, process, block, logger, text = match.groups()
    return {"time": when, "level": level, "pid": int(pid), "process": process, "block": block,
            "logger": logger, "message": text}


def follow(domain: str, stop: threading.Event | None = None, interval: float = 0.2, *, last: int = 0):
    """The last ``last`` lines of the domain's log, then every line appended to it, across
    rotations (``tail -n LAST -F``): an iterator that ends when ``stop`` is set.  The file
    is opened by this call, so nothing written after it returns is missed; a log that
    does not exist yet is waited for and read from its first line."""
    path = log_path(domain)
    check_int("last", last, 0)
    f = _open_log(path)
    backlog, pending = _read_backlog(f, last) if f is not None else ([], "")
    return _follow(path, f, backlog, pending, stop, interval)


def _open_log(path: str):
    try:
        # newline="": a line ends at "\n" only, as the writers end it
        return open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - the follower keeps it
    except FileNotFoundError:
        return None


def _read_backlog(f, last: int) -> tuple[list[str], str]:
    """The last ``last`` complete lines of an open log, and the start of a line being
    written after them; the file is left at its end."""
    if not last:
        f.seek(0, os.SEEK_END)
        return [], ""
    *lines, pending = f.read().split("\n")
    return lines[-last:], pending


def _follow(path: str, f, backlog: list[str], pending: str, stop, interval: float):
    ino = os.fstat(f.fileno()).st_ino if f is not None else None
    try:
        yield from backlog
        while stop is None or not stop.is_set():
            if f is None:  # no log yet, or rotated: the new file is read from its first line
                f = _open_log(path)
                if f is None:
                    time.sleep(interval)
                    continue
                ino = os.fstat(f.fileno()).st_ino
            chunk = f.read()
            if chunk:
                *lines, pending = (pending + chunk).split("\n")
                yield from lines
                continue
            if _rotated(path, ino):  # what was left of the old file was read above; go on in the new
                if pending:
                    yield pending
                f.close()
                f, pending = None, ""
                continue
            time.sleep(interval)  # no wake-up to wait on without inotify: poll, as tail -F does
    finally:
        if f is not None:
            f.close()


def _rotated(path: str, ino: int | None) -> bool:
    try:
        return os.stat(path).st_ino != ino
    except FileNotFoundError:
        return False  # being rotated: the new file comes next
