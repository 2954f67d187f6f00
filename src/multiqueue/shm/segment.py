"""Named shared-memory segments under /dev/shm: create, open, check, remove.

Plain files on the tmpfs, mapped with mmap (not ``multiprocessing.shared_memory``),
built under a temporary name and hard-linked into place, so no process opens a
half-built segment and creating never replaces one.  See docs/shm.md, "Domains".
"""

import ctypes
import errno
import fcntl
import grp
import mmap
import os
import re
import resource
import threading
import time
import uuid
from dataclasses import dataclass

from ..errors import SegmentError, SegmentVersionError
from .layout import LAYOUT_VERSION, SegmentHeader

SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "mq."
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{0,24}\.?$")


def check_domain(domain: str) -> str:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(
            f"invalid domain name {domain!r}: use 1-64 letters, digits, '_' or '-' "
            "(it becomes part of file names under /dev/shm)"
        )
    return domain


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"invalid name_prefix {prefix!r}: up to 24 letters, digits, '_' or '-'")
    return prefix


def segment_path(prefix: str, domain: str, obj: str) -> str:
    return os.path.join(SHM_DIR, f"{prefix}{domain}.{obj}")


def domain_segments(prefix: str, domain: str) -> list[str]:
    """Every file of a domain under /dev/shm (including unpublished temporaries)."""
    start = f"{prefix}{domain}."
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(SHM_DIR, n) for n in names if n.startswith(start))


def process_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None if it does not exist.

    pid plus start time names a process uniquely: pids get reused, start times do not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # zombie or dead: no longer runs anything
        return None
    return int(fields[19])


def is_alive(pid: int, start_time: int) -> bool:
    return pid > 0 and process_start_time(pid) == start_time


def _open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open with an actionable error when the process is out of file descriptors."""
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        whose = "this process" if e.errno == errno.EMFILE else "the system"
        raise SegmentError(
            e.errno,
            f"cannot open segment {path}: {whose} has no file descriptor left (the process limit is "
            f"{soft}, now {open_fds()} open); raise it (`ulimit -n`, resource.setrlimit) or close files",
        ) from None


def _map(fd: int, size: int, path: str, **kwargs) -> mmap.mmap:
    """mmap with an actionable error when the process is out of memory maps."""
    try:
        return mmap.mmap(fd, size, **kwargs)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise SegmentError(
            e.errno,
            f"cannot map segment {path} ({size / 2**20:.1f} MiB): the process has {count_maps()} memory "
            f"maps and the limit is vm.max_map_count={max_map_count()}, or address space is exhausted; "
            "raise the limit (sysctl -w vm.max_map_count=N) or use fewer, larger pools",
        ) from None


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def count_maps() -> int:
    """How many memory maps this process has (each mapped segment is one)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def max_map_count() -> int:
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())


class Segment:
    """One mapped segment: its path, file descriptor, mmap and header."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap):
        self.path = path
        self.fd = fd
        self.mmap = mm
        self.header = SegmentHeader.from_buffer(mm)

    @property
    def size(self) -> int:
        return len(self.mmap)

    def __del__(self):
        if self.fd >= 0:  # dropped without close(): at least give the descriptor back
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unmap and close; views still held elsewhere keep the memory mapped until freed."""
        self.header = None
        try:
            self.mmap.close()
        except BufferError:
            pass  # live memoryviews or numpy arrays still use it; munmap happens when they go
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fill_header(mm: mmap.mmap, magic: int, kind: int, header_size: int) -> None:
    hdr = SegmentHeader.from_buffer(mm)
    hdr.version = LAYOUT_VERSION
    hdr.kind = kind
    hdr.creator_pid = os.getpid()
    hdr.header_size = header_size
    hdr.creator_start = process_start_time(os.getpid()) or 0
    hdr.created_ns = time.time_ns()
    hdr.total_size = len(mm)
    hdr.magic = magic  # last: a segment with a magic is complete
    del hdr


@dataclass(frozen=True)
class Access:
    """Who may open a domain's segments: the owner only, or also one group.

    Every segment of a domain gets the access of its control segment, so a pool
    grown or a queue created by any process is as open as the domain, no more.
    """

    mode: int = 0o600
    gid: int | None = None  # the group that shares the domain (mode 0660), None: owner only

    @classmethod
    def for_group(cls, group: int | None) -> "Access":
        return cls() if group is None else cls(0o660, group)

    @classmethod
    def of(cls, fd: int) -> "Access":
        """The access of an existing segment (the domain's control segment)."""
        st = os.fstat(fd)
        return cls(0o660, st.st_gid) if st.st_mode & 0o060 else cls()


OWNER_ONLY = Access()


def resolve_group(group: str | int) -> int:
    """A group's id from its name or id; ValueError naming it if the system has none."""
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise TypeError(f"group must be a group name or id, not {type(group).__name__}")
    if isinstance(group, int):  # an id needs no name (a container may have none for it)
        if not 0 <= group < 2**32 - 1:
            raise ValueError(f"group id {group} is out of range")
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}: name an existing group (see `getent group`)") from None


def _apply_access(fd: int, path: str, access: Access) -> None:
    if access.gid is not None:
        try:
            os.fchown(fd, -1, access.gid)
        except PermissionError:
            name = _group_name(access.gid)
            raise SegmentError(
                errno.EPERM,
                f"cannot share segment {path} with group {name!r}: this user is not a member of it; "
                f"add the user to {name!r} (usermod -aG {name} USER) or create the domain without group",
            ) from None
    os.fchmod(fd, access.mode)  # the umask may have narrowed it; never widen beyond `mode`


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def create_segment(path, size, magic, kind, header_size, init=None, access: Access = OWNER_ONLY):
    """Create and publish a segment; returns it, or None if `path` already exists.

    The space is reserved with posix_fallocate, so a full /dev/shm fails here with a
    clear error instead of a SIGBUS when a page is first touched.
    """
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = _open_file(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    segment = None
    try:
        _apply_access(fd, path, access)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise SegmentError(
                    e.errno,
                    f"cannot reserve {size / 2**20:.1f} MiB for segment {path}: /dev/shm is "
                    "full; free space there (`df -h /dev/shm`) or configure smaller pools",
                ) from None
            raise
        mm = _map(fd, size, path)
        if init is not None:
            init(mm)
        _fill_header(mm, magic, kind, header_size)
        try:
            os.link(tmp, path)
        except FileExistsError:
            mm.close()
            return None
        segment = Segment(path, fd, mm)
        return segment
    finally:
        os.unlink(tmp)
        if segment is None:
            os.close(fd)


def open_segment(path: str, magic: int, kind: int) -> Segment:
    """Open and check an existing segment (magic, kind, layout version, size)."""
    try:
        fd = _open_file(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(errno.ENOENT, f"segment {path} does not exist") from None
    except PermissionError:
        raise SegmentError(
            errno.EACCES,
            f"permission denied opening segment {path}: it belongs to another user "
            "(segments are created owner-only); run as that user",
        ) from None
    try:
        size = os.fstat(fd).st_size
        if size < ctypes.sizeof(SegmentHeader):
            raise SegmentError(errno.EINVAL,
                               f"segment {path} is truncated ({size} bytes); {removal_hint(path)}")
        mm = _map(fd, size, path)
        hdr = SegmentHeader.from_buffer_copy(mm[: ctypes.sizeof(SegmentHeader)])
        if hdr.magic != magic or hdr.kind != kind:
            mm.close()
            raise SegmentError(
                errno.EINVAL,
                f"segment {path} is not a multiqueue segment of the expected kind: it has "
                f"magic {hdr.magic:#x} kind {hdr.kind}, expected magic {magic:#x} kind {kind}; "
                f"{removal_hint(path)}",
            )
        if hdr.version != LAYOUT_VERSION:
            mm.close()
            raise SegmentVersionError(
                errno.EINVAL,
                f"segment {path} has layout version {hdr.version} but this multiqueue "
                f"uses version {LAYOUT_VERSION}; stop the processes of the other version and remove "
                f"the domain ({clean_command(path)}), or use another domain name",
            )
        if hdr.total_size != size:
            mm.close()
            raise SegmentError(
                errno.EINVAL,
                f"segment {path} is truncated: header says {hdr.total_size} bytes, file has {size}; "
                f"{removal_hint(path)}",
            )
        return Segment(path, fd, mm)
    except BaseException:
        os.close(fd)
        raise


def removal_hint(path: str) -> str:
    """What to do with a damaged segment, for its error message."""
    return f"if no process uses its domain, remove the domain ({clean_command(path)})"


def clean_command(path: str) -> str:
    """The commands that remove the domain of a segment."""
    name = os.path.basename(path)
    domain = name[len(DEFAULT_PREFIX):].split(".", 1)[0] if name.startswith(DEFAULT_PREFIX) else "DOMAIN"
    return f"`mq clean {domain}`, or ShmManager.cleanup"


def unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def mapped_by(paths: list[str]) -> list[int]:
    """Pids of the processes (that we may look at) with one of these files mapped.

    By inode: a mapping shows the name the segment was built under (a deleted temporary)."""
    wanted = set()
    for path in paths:
        try:
            wanted.add(str(os.stat(path).st_ino))
        except FileNotFoundError:
            pass
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if any(line.split(maxsplit=5)[4] in wanted for line in f if SHM_DIR in line):
                    pids.append(int(entry))
        except (OSError, IndexError):
            continue  # gone, or not ours to look at
    return pids


def describe_processes(pids: list[int]) -> str:
    """"pid 12: python3 app.py, pid 34: ...": who the processes are, for a message."""
    return ", ".join(f"pid {pid}: {process_command(pid)}" for pid in pids)


def process_command(pid: int, limit: int = 60) -> str:
    """A process's command line (shortened), else its name, else "?" (gone, or not ours)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().decode(errors="replace").replace("\0", " ").split())
        if not command:
            with open(f"/proc/{pid}/comm", "rb") as f:
                command = f.read().strip().decode(errors="replace")
    except OSError:
        return "?"
    return command if len(command) <= limit else command[: limit - 3] + "..."


class DomainLock:
    """Mutual exclusion for a domain's slow paths (registry, pool changes, reaping).

    flock on the control segment excludes other processes and is released by the
    kernel when a holder dies, so a crash never leaves the domain locked.  flock does
    not exclude threads sharing the descriptor, hence the thread lock in front of it.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._thread_lock = threading.RLock()
        self._depth = 0

    def __enter__(self):
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()
