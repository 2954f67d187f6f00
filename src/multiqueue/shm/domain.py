"""A domain's files: its control segment opened, or created with the configured pools,
and every segment of the domain removed."""

import ctypes
import errno
import logging
import os

from ..errors import DomainInUseError, SegmentError
from . import layout as L
from .config import ShmConfig
from .pools import create_pool
from .resources import preflight
from .segment import (
    Access,
    DomainLock,
    create_segment,
    describe_processes,
    domain_segments,
    is_alive,
    mapped_by,
    open_segment,
    segment_path,
    unlink_quietly,
)

_log = logging.getLogger("multiqueue.shm")


def open_or_create_control(prefix: str, domain: str, config: ShmConfig, create: bool, new_context):
    """The domain's control segment, created with ``config`` if the domain does not
    exist and ``create`` is true (else SegmentError).

    ``new_context(mm, slot)`` is the C extension's Context class: handed in because only
    the modules pyproject.toml lists import the extension (see its import-linter notes).
    """
    path = segment_path(prefix, domain, "ctl")
    for _ in range(100):
        try:
            return open_segment(path, L.MAGIC_CONTROL, L.KIND_CONTROL)
        except SegmentError as e:
            if os.path.exists(path) or "does not exist" not in str(e):
                raise
            if not create:
                raise SegmentError(e.errno, f"domain {domain!r} does not exist (no {path})") from None
        _preflight(config, domain)
        seg = _create_domain(path, prefix, domain, config, new_context)
        if seg is not None:
            return seg
        # another process published it first: attach to theirs
    raise SegmentError(0, f"could not create or open {path}")


def check_control(seg, domain: str) -> None:
    """Refuse (closing it) a control segment whose header does not describe tables
    that fit in it."""
    problem = control_damage(seg)
    if problem is not None:
        seg.close()
        raise SegmentError(errno.EINVAL, f"control segment {seg.path} of domain {domain!r} is corrupt: "
                           f"{problem}; stop its processes and remove it (`mq clean {domain}`)")


def control_damage(seg) -> str | None:
    """What is wrong with an opened control segment's tables, or None."""
    if len(seg.mmap) < ctypes.sizeof(L.Control):
        return f"it has {len(seg.mmap)} bytes, less than its header's {ctypes.sizeof(L.Control)}"
    return L.control_problem(L.Control.from_buffer_copy(seg.mmap), len(seg.mmap))


def remove_stale_domain(domain: str, prefix: str, force: bool = False) -> list[str]:
    """Remove the segments of a domain none of whose processes is alive; returns the
    paths removed.  DomainInUseError if a registered process still lives.

    A damaged domain (no control segment, or one this multiqueue cannot read: corrupt
    tables, truncated, another layout version) has no process table to ask: the
    processes that map its files are its users.  It is removed when none does; else
    refused, naming them, unless ``force`` (which never removes a readable domain
    with live registered processes).
    """
    paths = domain_segments(prefix, domain)
    control = segment_path(prefix, domain, "ctl")
    seg, damage = _open_to_clean(control) if control in paths else (None, "it has no control segment")
    if seg is None:
        if not force:
            _refuse_if_mapped(paths, domain, damage)
        for path in paths:
            unlink_quietly(path)
        return paths
    try:
        with DomainLock(seg.fd):
            live = _live_processes(seg)
            if live:
                raise DomainInUseError(
                    f"domain {domain!r} still has live processes "
                    f"{', '.join(f'{n} (pid {p})' for p, n in live)}; stop them first")
            for path in paths:
                unlink_quietly(path)
    finally:
        seg.close()
    return paths


def unlink_domain(prefix: str, domain: str) -> None:
    """Remove the domain's files; in a group-shared domain /dev/shm's sticky bit lets
    only each file's owner remove it, so other users' files are left (and named)."""
    kept = []
    for path in domain_segments(prefix, domain):
        try:
            unlink_quietly(path)
        except PermissionError:
            kept.append(path)
    if kept:
        _log.warning("left %d segment(s) of domain %r that belong to other users (only their owner "
                     "may remove them; run `mq cleanup %s` as that user): %s",
                     len(kept), domain, domain, ", ".join(kept))


def _open_to_clean(control: str):
    """(the control segment, None) to read the process table from, or (None, what is
    wrong) when this multiqueue cannot read it (another layout version, foreign, broken)."""
    try:
        seg = open_segment(control, L.MAGIC_CONTROL, L.KIND_CONTROL)
    except SegmentError as e:
        return None, e.strerror or str(e)
    damage = control_damage(seg)  # garbage tables must not be read as a process table
    if damage is not None:
        seg.close()
        return None, f"its control segment is corrupt: {damage}"
    return seg, None


def _refuse_if_mapped(paths: list[str], domain: str, damage: str) -> None:
    """DomainInUseError naming the live processes that map the domain's files, if any."""
    users = mapped_by(paths)
    if users:
        raise DomainInUseError(
            f"domain {domain!r} has no process table this multiqueue can read ({damage}), and processes "
            f"{', '.join(map(str, users))} map its segments ({describe_processes(users)}); stop them first, "
            f"or remove it anyway with `mq clean {domain} --force` (ShmManager.cleanup(..., force=True)): "
            "they keep their mappings, but nothing new can reach them")


def _live_processes(seg) -> list[tuple[int, str]]:
    c = L.Control.from_buffer(seg.mmap)
    procs = (L.Process * c.max_processes).from_buffer(seg.mmap, c.procs_offset)
    live = [(p.pid, p.name.decode(errors="replace")) for p in procs
            if p.state != L.PROC_FREE and is_alive(p.pid, p.start_time)]
    del c, procs
    return live


def _preflight(config: ShmConfig, domain: str) -> None:
    """Refuse a configuration this machine cannot hold, before creating anything."""
    report = preflight(config, domain)
    for warning in report.warnings:
        _log.warning("domain %r: %s", domain, warning)
    report.raise_errors()


def _create_domain(path: str, prefix: str, domain: str, config: ShmConfig, new_context):
    """Build the control segment and the configured pools, then publish the control.

    Pool segments are created first (their names carry a random token, so a racing
    creator cannot collide); if another process publishes the domain first, ours
    are removed and the caller attaches to theirs.
    """
    lay = L.control_layout(config.max_processes, config.max_pools, config.max_buffers)
    access = Access.for_group(config.gid)
    created_pools: list[str] = []

    def init(mm):
        c = L.Control.from_buffer(mm)
        c.max_processes, c.max_pools, c.max_buffers = (
            config.max_processes, config.max_pools, config.max_buffers)
        c.procs_offset, c.pools_offset = lay["procs"], lay["pools"]
        c.meta_offset, c.ledger_offset = lay["meta"], lay["ledger"]
        c.name_prefix = prefix.encode()
        del c
        ctx = new_context(mm, 0)
        try:
            for pool in config.pools:
                create_pool(mm, ctx, prefix, domain, pool, access, created_pools)
        finally:
            ctx.close()

    try:
        seg = create_segment(path, lay["total"], L.MAGIC_CONTROL, L.KIND_CONTROL, lay["procs"],
                             init, access)
    except BaseException:
        for p in created_pools:
            unlink_quietly(p)
        raise
    if seg is None:
        for p in created_pools:
            unlink_quietly(p)
    return seg
