"""`mq doctor`'s report: who holds each buffer, where every block of each pool is, the
findings and their fixes, as data and as text (:func:`tools.doctor.diagnose` makes it)."""

from dataclasses import asdict, dataclass, field


@dataclass
class Holder:
    """Who holds references of one buffer: a process (its ledger row) or a queue reader."""

    kind: str  # "process" or "queue"
    pid: int
    alive: bool
    count: int  # references held
    name: str = ""  # the process's registered name ("" if unknown)
    proc_slot: int | None = None  # the process's slot in the domain's registry
    queue: str | None = None  # kind "queue": the queue's name and reader index
    reader: int | None = None
    blocks: list[str] = field(default_factory=list)  # kind "process": the graph blocks it runs
    edge: str | None = None  # kind "queue": the graph edge the reader serves ("a.out -> b.in")

    def describe(self) -> str:
        who = f"pid {self.pid}" + (f" {self.name!r}" if self.name else "")
        state = "alive" if self.alive else "DEAD"
        if self.kind == "queue":
            edge = f" of edge {self.edge}" if self.edge else ""
            return f"queue {self.queue!r} reader {self.reader}{edge} ({who}, {state})"
        runs = f", block {', '.join(self.blocks)}" if self.blocks else ""
        return f"process {who} ({state}{runs})"


@dataclass
class BufferInfo:
    """One buffer with a non-zero reference count (or a block a dead process took unpublished)."""

    id: int  # generation << 32 | slot
    slot: int
    generation: int
    pool: str
    pool_id: int
    size: int | None  # requested size (None for an unpublished block)
    capacity: int  # the pool's block size
    ref_count: int
    creator_pid: int
    age_s: float | None  # since allocation
    holders: list[Holder] = field(default_factory=list)
    leftover: int = 0  # ref_count - references held by the holders: > 0 leak, < 0 inconsistent
    unpublished: bool = False  # popped by a process that died before publishing it

    @property
    def accounted(self) -> int:
        return sum(h.count for h in self.holders)


@dataclass
class ProcessInfo:
    slot: int
    pid: int
    name: str
    state: str  # "registered" or "reaping" (a reaper is releasing its references)
    alive: bool
    references: int  # references its ledger records on live buffers
    buffers: int  # how many buffers those are
    unpublished: int  # blocks it took and never published (only matters once it is dead)
    heartbeat_age_s: float


@dataclass
class ReaderInfo:
    index: int
    pid: int
    name: str
    alive: bool
    policy: str
    unread: int  # items (references) it holds


@dataclass
class QueueInfo:
    name: str
    path: str
    capacity: int
    pushed: int
    closed: str  # "open", "closed" or "abandoned"
    readers: list[ReaderInfo] = field(default_factory=list)


@dataclass
class PoolInfo:
    """Where every block of one pool is: free, held, taken by a dead process, or lost."""

    name: str
    pool_id: int
    blocks: int
    free: int | None  # None: the free list kept changing while it was walked (a busy pool)
    held: int  # blocks with references
    unpublished: int  # taken by a process that died before publishing them (reaping returns them)
    lost: int  # none of the above in every snapshot: leaked blocks
    limit: int = 0  # the most blocks it can have (an expandable pool's max_blocks)
    holders: dict[str, int] = field(default_factory=dict)  # Holder.describe() -> blocks it holds

    def describe(self) -> str:
        free = "busy" if self.free is None else str(self.free)
        return (f"{self.name}: {self.blocks} blocks = {free} free + {self.held} held"
                + (f" + {self.unpublished} unpublished" if self.unpublished else "")
                + (f" + {self.lost} LOST" if self.lost else "")
                + (f" (expandable to {self.limit})" if self.limit > self.blocks else ""))


@dataclass
class Finding:
    kind: str  # dead-process, dead-reader, leak, lost-block, pool-full, inconsistent, unreadable-segment
    message: str
    fix: str
    pid: int | None = None
    references: int = 0  # the references involved
    buffers: list[int] = field(default_factory=list)  # ids of the buffers involved


@dataclass
class DoctorReport:
    domain: str
    prefix: str
    control_path: str
    processes: list[ProcessInfo]
    queues: list[QueueInfo]
    buffers: list[BufferInfo]
    findings: list[Finding]
    pools: list[PoolInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        for b in out["buffers"]:
            b["id_hex"] = f"{b['id']:#x}"
        return out

    def format(self) -> str:
        lines = [f"mq doctor: domain {self.domain!r} ({self.control_path})"]
        lines += _format_processes(self.processes) + _format_queues(self.queues)
        lines.append(f"pools ({len(self.pools)}):")
        lines.extend(f"  {p.describe()}" for p in self.pools)
        lines += _format_buffers(self.buffers)
        if self.ok:
            lines.append("no problems found: every reference and every block is accounted for and every "
                         "holder is alive")
        else:
            lines.append(f"findings ({len(self.findings)}):")
            for f in self.findings:
                lines.append(f"  {f.kind.upper()}: {f.message}")
                lines.append(f"    fix: {f.fix}")
        return "\n".join(lines)


def _format_processes(processes: list[ProcessInfo]) -> list[str]:
    lines = [f"processes ({len(processes)} registered):"]
    if processes:
        lines.append(f"  {'slot':>4}  {'pid':>8}  {'name':<20} {'state':<9} {'refs':>6} {'buffers':>8}")
    for p in processes:
        state = ("alive" if p.alive else "DEAD") + (" (reaping)" if p.state == "reaping" else "")
        lines.append(f"  {p.slot:>4}  {p.pid:>8}  {p.name[:20]:<20} {state:<9} {p.references:>6} "
                     f"{p.buffers:>8}" + (f"  +{p.unpublished} unpublished" if p.unpublished else ""))
    return lines


def _format_queues(queues: list[QueueInfo]) -> list[str]:
    lines = [f"queues ({len(queues)}):"]
    for q in queues:
        lines.append(f"  {q.name}: capacity {q.capacity}, {q.pushed} pushed, {q.closed}, "
                     f"{len(q.readers)} reader(s)")
        for r in q.readers:
            who = f"pid {r.pid}" + (f" {r.name!r}" if r.name else "")
            lines.append(f"    reader {r.index}: {who}, {'alive' if r.alive else 'DEAD'}, {r.policy}, "
                         f"{r.unread} unread")
    return lines


def _format_buffers(buffers: list[BufferInfo]) -> list[str]:
    """One row per holder of each buffer, plus one for references nobody accounts for."""
    lines = [f"held buffers ({len(buffers)}):"]
    if buffers:
        lines.append(f"  {'id':<20}{'pool':<12}{'size/capacity':>16}{'refs':>6}  {'holder':<52}{'count':>6}")
    for b in buffers:
        size = f"{'-' if b.size is None else b.size}/{b.capacity}"
        rows = [(h.describe(), h.count) for h in b.holders]
        if b.unpublished:
            rows = [(f"{d} took it, never published", c) for d, c in rows]
        if b.leftover > 0:
            rows.append(("UNACCOUNTED (leak)", b.leftover))
        elif b.leftover < 0:
            rows.append(("OVERCOUNTED (inconsistent)", b.leftover))
        rows = rows or [("-", 0)]
        head = f"  {b.id:<#20x}{b.pool[:11]:<12}{size:>16}{b.ref_count:>6}  "
        for i, (desc, count) in enumerate(rows):
            lines.append((head if i == 0 else " " * len(head)) + f"{desc:<52}{count:>6}")
    return lines
