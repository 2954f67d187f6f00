"""An explicit-state model checker of multiqueue's shared-memory protocols.

The lock-free parts of ``src/multiqueue/_native.c`` (the pools' tagged Treiber free lists,
the reference counts in the metadata entries' ``state`` words, the per-process hold ledger
and its crash reclaim, the port queues' ring, cursors and lock) are modelled here as
*operations*, each a small table of steps.  One atomic step is ONE memory action of the C
code (one load, one store, one compare-and-swap, one fetch-add), in the C code's order; the
``where`` text of each step names the C function and the statement it mirrors (names, not
line numbers, which drift).  Local computation (comparisons, branches, arithmetic on values
already loaded) runs between atomic steps as *pure* steps, which get no memory at all
(``m`` is None there), so a pure step cannot cheat.

Words the model keeps constant are not loaded (pool state and epoch, ``slots_used``, an
entry's ``pool_id``, a reader's ``policy`` is read under the queue lock that its writer
holds); statistics (``alloc_count``, ``high_water``, ``pushed``, ``popped``, ``drops``),
timestamps and the futex wake-ups (``wake()``: an event word and an armed flag, which carry
no reference) are left out.  A blocking wait (a full queue, an empty queue, an empty pool,
a busy queue lock, a message not yet sent) is a guarded step: it is enabled when what it
waits for is there, and a state where every live process waits is reported as a deadlock.

:class:`Checker` explores every interleaving of two worker processes' programs
(breadth-first, states hashed), optionally with one of them killed before ANY of its steps;
after a death a reaper (the domain's ``reap()``: ``Context.reclaim`` of the dead ledger row,
then ``PortQueue.reap_dead_readers``) runs interleaved with the survivor.  Invariants are
checked in every reachable state (see :meth:`Checker.check_state`) and at every end state
(:meth:`Checker.outcome`); an end state after a death is classified as clean or as the
references / blocks it leaks, per death point ``(operation, step)``.

To change an operation (say the C code changes order), edit its ``def op_...`` below: its
steps are listed in one place, in C order.  ``Variant`` flags swap in known-broken versions
(the "mutations" the tests use to show the checker finds real bugs).

Run ``python tests/protocol_model.py`` to print the death-point tables.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

M32 = 0xFFFFFFFF
UINT32_MAX = M32
ACTIVE, FREE_READER = 1, 0
POLICY_BLOCK, POLICY_DROP = 0, 1
REAPER = 2  # process index of the reaper (a third process: a supervisor, `mq doctor`, a manager's thread)


def lo(word: int) -> int:
    return word & M32


def hi(word: int) -> int:
    return word >> 32


class Violation(AssertionError):
    """An invariant broke; ``trace`` is the shortest path of steps that reaches it."""

    def __init__(self, message: str, trace: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.trace = trace or []

    def __str__(self) -> str:
        steps = "\n  ".join(self.trace[-60:])
        return f"{self.message}\ntrace ({len(self.trace)} steps):\n  {steps}" if self.trace else self.message


# ------------------------------------------------------------------ operations


class Call(NamedTuple):
    op: str
    args: dict
    ret: str  # label of the caller's step that continues (it finds the value in L["_r"])


class Ret(NamedTuple):
    value: Any


BLOCK = "<blocked>"  # a guarded step that is not enabled in this state


class Step(NamedTuple):
    label: str
    where: str
    fn: Any
    pure: bool


class Op:
    """One operation: steps by label; the first one added is the entry."""

    def __init__(self, name: str):
        self.name = name
        self.steps: dict[str, Step] = {}
        self.entry: str | None = None

    def atomic(self, label: str, where: str):
        return self._add(label, where, False)

    def pure(self, label: str, where: str = "local"):
        return self._add(label, where, True)

    def _add(self, label, where, pure):
        def deco(fn):
            assert label not in self.steps, (self.name, label)
            self.steps[label] = Step(label, where, fn, pure)
            if self.entry is None:
                self.entry = label
            return fn
        return deco


@dataclass(frozen=True)
class Variant:
    """Known-broken versions of operations, to prove the checker catches them."""

    no_tag: bool = False              # free-list head without the ABA tag
    release_count_first: bool = False  # release: CAS the count down, then the ledger
    acquire_no_gen: bool = False      # acquire: no generation check (any live count will do)
    # join marks the reader ACTIVE before it raises readers_hw (the order before the fix: a joiner
    # killed between the two stores hid an active reader from pushes and reaps)
    join_state_first: bool = False


class X(NamedTuple):
    """What a step knows besides memory and its locals."""

    me: int
    cfg: Config
    variant: Variant
    events: set  # interleavings worth knowing were explored (see Checker.events)


def alive(m, p: int) -> bool:
    return p == REAPER or bool(m[f"alive{p}"])


def ledger_key(p: int, slot: int) -> str:
    return f"L{p}.{slot}"


def build_ops(v: Variant) -> dict[str, Op]:
    ops: dict[str, Op] = {}

    def op(name: str) -> Op:
        ops[name] = Op(name)
        return ops[name]

    # ---------------------------------------------------------- free list (Treiber)
    o = op("freelist_pop")

    @o.atomic("load_head", "_native.c freelist_pop: head = LOAD(&pool->head)")
    def pop_load_head(m, L, x):
        L["h"] = m["pool.head"]
        return "load_next" if lo(L["h"]) else Ret(-1)  # :168 top == 0 -> -1

    @o.atomic("load_next", "_native.c freelist_pop: next = entries[top - 1].next_free")
    def pop_load_next(m, L, x):
        L["next"] = m[f"nx{lo(L['h']) - 1}"]
        return "cas"

    @o.atomic("cas", "_native.c freelist_pop: CAS(&pool->head, &head, (tag + 1) << 32 | next)")
    def pop_cas(m, L, x):
        if m["pool.head"] != L["h"]:
            if lo(m["pool.head"]) == lo(L["h"]):
                x.events.add("pop CAS failed on the tag alone (ABA averted)")
            L["h"] = m["pool.head"]  # a failed CAS updates `head`
            return "load_next" if lo(L["h"]) else Ret(-1)
        desired = L["next"] if v.no_tag else ((hi(L["h"]) + 1) & M32) << 32 | L["next"]
        slot = lo(L["h"]) - 1
        if slot not in m["g.free"]:
            raise Violation(f"P{x.me} popped slot {slot}, which is not free (handed out twice)")
        m["pool.head"] = desired
        m["g.free"] = m["g.free"] - {slot}
        return Ret(slot)

    o = op("freelist_push")  # args: slot

    @o.atomic("load_head", "_native.c freelist_push: head = LOAD(&pool->head)")
    def push_load_head(m, L, x):
        L["h"] = m["pool.head"]
        return "store_next"

    @o.atomic("store_next", "_native.c freelist_push: entries[slot].next_free = (uint32_t)head")
    def push_store_next(m, L, x):
        m[f"nx{L['slot']}"] = lo(L["h"])
        return "cas"

    @o.atomic("cas", "_native.c freelist_push: CAS(&pool->head, &head, (tag + 1) << 32 | slot + 1)")
    def push_cas(m, L, x):
        if m["pool.head"] != L["h"]:
            L["h"] = m["pool.head"]
            return "store_next"
        slot = L["slot"]
        if slot in m["g.free"]:
            raise Violation(f"P{x.me} pushed slot {slot}, which is already free (double free)")
        m["pool.head"] = (slot + 1) if v.no_tag else ((hi(L["h"]) + 1) & M32) << 32 | (slot + 1)
        m["g.free"] = m["g.free"] | {slot}
        return Ret(None)

    o = op("free_block")  # args: slot

    @o.pure("push", "_native.c free_block: freelist_push(pool, entries, slot)")
    def fb_push(m, L, x):
        return Call("freelist_push", {"slot": L["slot"]}, "used_sub")

    @o.atomic("used_sub", "_native.c free_block: fetch_sub(&pool->used, 1)")
    def fb_used_sub(m, L, x):
        m["pool.used"] -= 1
        return Ret(None)  # :303 wake(): futex words only, not modelled

    o = op("drop_refs")  # args: slot, gen, count -> 1 freed, 0 still held, -1 invalid

    def drop_check(L):
        st = L["st"]
        return Ret(-1) if hi(st) != L["gen"] or lo(st) < L["count"] else "cas"  # :313

    @o.atomic("load", "_native.c drop_refs: state = LOAD(&e->state)")
    def dr_load(m, L, x):
        L["st"] = m[f"st{L['slot']}"]
        return drop_check(L)

    @o.atomic("cas", "_native.c drop_refs: CAS(&e->state, &state, state - count)")
    def dr_cas(m, L, x):
        key = f"st{L['slot']}"
        if m[key] != L["st"]:
            L["st"] = m[key]
            return drop_check(L)
        m[key] = L["st"] - L["count"]
        if lo(L["st"]) != L["count"]:
            return Ret(0)  # :316
        m["g.alive"] = m["g.alive"] - {(L["slot"], L["gen"])}  # ghost: this allocation is over
        return Call("free_block", {"slot": L["slot"]}, "freed")  # :317

    @o.pure("freed")
    def dr_freed(m, L, x):
        return Ret(1)

    # ---------------------------------------------------------------- buffers
    o = op("alloc_block")  # -> id, or -1 pool empty

    @o.pure("pop", "_native.c alloc_block: freelist_pop(pool, entries)")
    def al_pop(m, L, x):
        return Call("freelist_pop", {}, "popped")

    @o.pure("popped")
    def al_popped(m, L, x):
        if L["_r"] < 0:
            return Ret(-1)  # :345
        L["slot"] = L["_r"]
        return "used_add"

    @o.atomic("used_add", "_native.c alloc_block: add_fetch(&pool->used, 1)")
    def al_used_add(m, L, x):
        m["pool.used"] += 1
        return "load_gen"  # :348 pool state (constant here), :358-362 high_water (statistics)

    @o.atomic("load_gen", "_native.c alloc_block: gen = (state >> 32) + 1")
    def al_load_gen(m, L, x):
        L["st"] = m[f"st{L['slot']}"]
        gen = (hi(L["st"]) + 1) & M32
        L["gen"] = gen or 1  # :365
        return "ledger_store"

    @o.atomic("ledger_store", "_native.c alloc_block: STORE(&ledger[slot], gen << 32 | 1)")
    def al_ledger_store(m, L, x):
        m[ledger_key(x.me, L["slot"])] = L["gen"] << 32 | 1
        return "publish"

    @o.atomic("publish", "_native.c alloc_block: STORE(&e->state, gen << 32 | 1)")
    def al_publish(m, L, x):
        key, slot = f"st{L['slot']}", L["slot"]
        if m[key] != L["st"] or lo(m[key]) != 0:
            raise Violation(f"P{x.me} publishes slot {slot} over state {m[key]:#x} (it read "
                            f"{L['st']:#x}): someone touched a block that was popped")
        m[key] = L["gen"] << 32 | 1
        m["g.alive"] = m["g.alive"] | {(slot, L["gen"])}
        return Ret(L["gen"] << 32 | slot)

    o = op("acquire")  # args: id -> 0, or -1 stale

    def acq_check(L, x):
        st = L["st"]
        stale = lo(st) == 0 if v.acquire_no_gen else hi(st) != L["gen"] or lo(st) == 0
        if stale and hi(st) != L["gen"] and lo(st) > 0:
            x.events.add("acquire of a stale id refused on a reused slot")
        return Ret(-1) if stale else "cas"  # :418

    @o.atomic("load", "_native.c Context_acquire: state = LOAD(&e->state)")
    def acq_load(m, L, x):
        L["slot"], L["gen"] = lo(L["id"]), hi(L["id"])  # :412-414 parse, gen 0 / range checks
        L["st"] = m[f"st{L['slot']}"]
        return acq_check(L, x)

    @o.atomic("cas", "_native.c Context_acquire: CAS(&e->state, &state, state + 1)")
    def acq_cas(m, L, x):
        key = f"st{L['slot']}"
        if m[key] != L["st"]:
            L["st"] = m[key]
            return acq_check(L, x)
        if (L["slot"], L["gen"]) not in m["g.alive"]:
            raise Violation(f"P{x.me} acquired id {L['id']:#x} whose allocation is over: a stale id "
                            f"took a reference on slot {L['slot']} (state {m[key]:#x})")
        m[key] = L["st"] + 1
        return "ledger_load"

    @o.atomic("ledger_load", "_native.c Context_acquire: held = ledger[slot]")
    def acq_ledger_load(m, L, x):
        L["held"] = m[ledger_key(x.me, L["slot"])]
        return "ledger_store"

    @o.atomic("ledger_store", "_native.c Context_acquire: STORE(&ledger[slot], gen << 32 | count)")
    def acq_ledger_store(m, L, x):
        held = L["held"]
        count = lo(held) + 1 if hi(held) == L["gen"] else 1
        m[ledger_key(x.me, L["slot"])] = L["gen"] << 32 | count
        return Ret(0)

    o = op("release_ref")  # args: id -> 1 freed, 0 still held, -1 not held

    @o.atomic("ledger_load", "_native.c release_ref: held = ledger[slot]")
    def rel_ledger_load(m, L, x):
        L["slot"], L["gen"] = lo(L["id"]), hi(L["id"])
        L["held"] = m[ledger_key(x.me, L["slot"])]
        if hi(L["held"]) != L["gen"] or lo(L["held"]) == 0:
            return Ret(-1)  # :437
        if v.release_count_first:
            return Call("drop_refs", {"slot": L["slot"], "gen": L["gen"], "count": 1}, "ledger_store")
        return "ledger_store"

    @o.atomic("ledger_store", "_native.c release_ref: STORE(&ledger[slot], held - 1)")
    def rel_ledger_store(m, L, x):
        m[ledger_key(x.me, L["slot"])] = L["held"] - 1
        if v.release_count_first:
            return Ret(L["_r"])
        return Call("drop_refs", {"slot": L["slot"], "gen": L["gen"], "count": 1}, "done")  # :439

    @o.pure("done")
    def rel_done(m, L, x):
        return Ret(L["_r"])

    o = op("reclaim")  # args: dead -> None; the caller holds the domain lock

    @o.atomic("row_load", "_native.c Context_reclaim: held = row[slot]")
    def rc_row_load(m, L, x):
        L.setdefault("slot", 0)
        L["held"] = m[ledger_key(L["dead"], L["slot"])]
        return "next" if L["held"] == 0 else "row_clear"  # :492

    @o.atomic("row_clear", "_native.c Context_reclaim: STORE(&row[slot], 0)")
    def rc_row_clear(m, L, x):
        m[ledger_key(L["dead"], L["slot"])] = 0
        if lo(L["held"]) == 0:
            return "next"  # :495
        args = {"slot": L["slot"], "gen": hi(L["held"]), "count": lo(L["held"])}
        return Call("drop_refs", args, "dropped")  # :496

    @o.pure("dropped")
    def rc_dropped(m, L, x):
        if L["_r"] >= 0:
            return "next"  # :497-501
        return "prev_load"

    @o.atomic("prev_load", "_native.c Context_reclaim: state = LOAD(&entries[slot].state)")
    def rc_prev_load(m, L, x):
        gen = hi(L["held"])
        previous = UINT32_MAX if gen == 1 else gen - 1  # :504
        st = m[f"st{L['slot']}"]
        if st == previous << 32 or (previous == UINT32_MAX and st == 0):  # :506
            x.events.add("reclaim returned a block the dead process popped but never published")
            return Call("free_block", {"slot": L["slot"]}, "next")  # :507
        x.events.add("reclaim met an entry neither valid nor popped-unpublished")
        return "next"

    @o.pure("next")
    def rc_next(m, L, x):
        L["slot"] += 1
        return Ret(None) if L["slot"] == x.cfg.blocks else "row_load"  # :490

    # ---------------------------------------------------------------- port queues
    o = op("queue_lock")  # -> 1; a dead holder's lock is stolen (PortQueue._break_dead_lock)

    @o.atomic("cas", "_native.c queue_lock: CAS(&q->lock, 0, me) (spins while a live holder keeps it)")
    def ql_cas(m, L, x):
        holder = m["q.lock"]
        if holder == 0:
            m["q.lock"] = x.me + 1
            return Ret(1)
        if alive(m, holder - 1):
            return BLOCK  # spinning (push/join/detach return -2 after 65536 tries; Python retries)
        return "py_holder"

    @o.atomic("py_holder", "queue.py _break_dead_lock: holder = header.lock; proc dead or not alive")
    def ql_py_holder(m, L, x):
        L["holder"] = m["q.lock"]
        if L["holder"] != 0 and not alive(m, L["holder"] - 1):
            return "steal"
        return "cas"

    @o.atomic("steal", "_native.c steal_lock: CAS(&q->lock, holder, 0)")
    def ql_steal(m, L, x):
        if m["q.lock"] == L["holder"]:
            m["q.lock"] = 0
            x.events.add("queue lock stolen from a dead holder")
        return "cas"

    o = op("queue_unlock")

    @o.atomic("store", "_native.c queue_unlock: STORE(&q->lock, 0)")
    def qu_store(m, L, x):
        if m["q.lock"] != x.me + 1:
            raise Violation(f"P{x.me} unlocks a queue lock held by {m['q.lock']} (stolen from a live holder)")
        m["q.lock"] = 0
        return Ret(None)

    o = op("take_item")  # args: r, cur -> (won, id)

    @o.atomic("ring_load", "_native.c take_item: id = LOAD(&ring[cur & mask].id)")
    def ti_ring_load(m, L, x):
        L["id"] = m[f"ring{L['cur'] & (x.cfg.capacity - 1)}"]
        return "cas"

    @o.atomic("cas", "_native.c take_item: CAS(&r->cursor, &cur, cur + 1)")
    def ti_cas(m, L, x):
        key = f"cur{L['r']}"
        if m[key] != L["cur"]:
            x.events.add("take_item lost the cursor CAS (pop against drop or detach)")
            return Ret((0, L["id"]))
        m[key] = L["cur"] + 1
        return Ret((1, L["id"]))

    o = op("add_queue_ref")  # args: id -> 1 taken, 0 not alive

    def aq_check(L):
        st = L["st"]
        return Ret(0) if hi(st) != L["gen"] or lo(st) == 0 or lo(st) == UINT32_MAX else "cas"  # :888

    @o.atomic("load", "_native.c add_queue_ref: state = LOAD(&e->state)")
    def aq_load(m, L, x):
        L["slot"], L["gen"] = lo(L["id"]), hi(L["id"])
        if L["gen"] == 0:
            return Ret(0)  # :884 (an empty ring slot holds id 0)
        L["st"] = m[f"st{L['slot']}"]
        return aq_check(L)

    @o.atomic("cas", "_native.c add_queue_ref: CAS(&e->state, &state, state + 1)")
    def aq_cas(m, L, x):
        key = f"st{L['slot']}"
        if m[key] != L["st"]:
            L["st"] = m[key]
            return aq_check(L)
        if (L["slot"], L["gen"]) not in m["g.alive"]:
            raise Violation(f"P{x.me} join took a reference on {L['id']:#x}, whose allocation is over")
        m[key] = L["st"] + 1
        return Ret(1)

    o = op("push_id")  # args: id -> 1 pushed, 0 full, -1 closed, -3 not held

    @o.atomic("closed_load", "_native.c push_id: LOAD(&q->closed)")
    def pu_closed(m, L, x):
        return Ret(-1) if m["q.closed"] else "ledger_load"

    @o.atomic("ledger_load", "_native.c push_id: held = ledger[slot]")
    def pu_ledger_load(m, L, x):
        L["slot"], L["gen"] = lo(L["id"]), hi(L["id"])
        L["held"] = m[ledger_key(x.me, L["slot"])]
        if hi(L["held"]) != L["gen"] or lo(L["held"]) == 0:
            return Ret(-3)  # :945
        return Call("queue_lock", {}, "head_load")  # :946

    @o.atomic("head_load", "_native.c push_id: head = q->head")
    def pu_head_load(m, L, x):
        L["head"] = m["q.head"]
        return "hw_load"

    @o.atomic("hw_load", "_native.c push_id: hw = LOAD(&q->readers_hw)")
    def pu_hw_load(m, L, x):
        L["hw"], L["i"] = m["q.hw"], 0
        return "b_next"

    @o.pure("b_next", "_native.c push_id: for each reader: a full blocking one refuses")
    def pu_b_next(m, L, x):
        if L["i"] == L["hw"]:
            L["i"], L["readers"] = 0, 0
            return "d_next"
        return "b_state"

    @o.atomic("b_state", "_native.c push_id: LOAD(&r->state), r->policy")
    def pu_b_state(m, L, x):
        i = L["i"]
        if m[f"rst{i}"] == ACTIVE and m[f"rpol{i}"] == POLICY_BLOCK:
            return "b_cursor"
        L["i"] += 1
        return "b_next"

    @o.atomic("b_cursor", "_native.c push_id: head - LOAD(&r->cursor) >= capacity")
    def pu_b_cursor(m, L, x):
        if L["head"] - m[f"cur{L['i']}"] >= x.cfg.capacity:
            return Call("queue_unlock", {}, "full")  # :953
        L["i"] += 1
        return "b_next"

    @o.pure("full")
    def pu_full(m, L, x):
        return Ret(0)

    @o.pure("d_next", "_native.c push_id: for each reader: drop the oldest of a full drop_oldest one")
    def pu_d_next(m, L, x):
        return "ledger_store" if L["i"] == L["hw"] else "d_state"

    @o.atomic("d_state", "_native.c push_id: LOAD(&r->state)")
    def pu_d_state(m, L, x):
        if m[f"rst{L['i']}"] != ACTIVE:
            L["i"] += 1
            return "d_next"
        return "d_cursor"

    @o.atomic("d_cursor", "_native.c push_id: cur = LOAD(&r->cursor); r->policy")
    def pu_d_cursor(m, L, x):
        i = L["i"]
        cur = m[f"cur{i}"]
        if L["head"] - cur >= x.cfg.capacity and m[f"rpol{i}"] != POLICY_BLOCK:
            return Call("take_item", {"r": i, "cur": cur}, "d_took")  # :963
        return "d_count"

    @o.pure("d_took")
    def pu_d_took(m, L, x):
        won, dropped = L["_r"]
        if won:  # :964 drop_queue_ref
            return Call("drop_refs", {"slot": lo(dropped), "gen": hi(dropped), "count": 1}, "d_count")
        return "d_count"

    @o.pure("d_count")
    def pu_d_count(m, L, x):
        L["readers"] += 1  # :968
        L["i"] += 1
        return "d_next"

    @o.atomic("ledger_store", "_native.c push_id: STORE(&ledger[slot], held - 1)")
    def pu_ledger_store(m, L, x):
        m[ledger_key(x.me, L["slot"])] = L["held"] - 1
        if L["readers"] == 0:  # :979 nobody listens
            return Call("drop_refs", {"slot": L["slot"], "gen": L["gen"], "count": 1}, "unlock")
        return "fetch_add" if L["readers"] > 1 else "ring_store"

    @o.atomic("fetch_add", "_native.c push_id: fetch_add(&e->state, readers - 1)")
    def pu_fetch_add(m, L, x):
        key = f"st{L['slot']}"
        if hi(m[key]) != L["gen"] or lo(m[key]) == 0:
            raise Violation(f"P{x.me} push adds references to {L['id']:#x} but its state is {m[key]:#x}")
        m[key] += L["readers"] - 1
        return "ring_store"

    @o.atomic("ring_store", "_native.c push_id: store(&ring[head & mask].id, id)")
    def pu_ring_store(m, L, x):
        m[f"ring{L['head'] & (x.cfg.capacity - 1)}"] = L["id"]
        return "head_store"

    @o.atomic("head_store", "_native.c push_id: STORE(&q->head, head + 1)")
    def pu_head_store(m, L, x):
        m["q.head"] = L["head"] + 1
        return Call("queue_unlock", {}, "done")

    @o.pure("unlock")
    def pu_unlock(m, L, x):
        return Call("queue_unlock", {}, "done")  # :989

    @o.pure("done")
    def pu_done(m, L, x):
        return Ret(1)

    o = op("pop_item")  # args: r -> id, or -1 empty, -2 closed and drained, -4 detached

    @o.atomic("state_load", "_native.c pop_item: LOAD(&r->state)")
    def po_state(m, L, x):
        return "cursor_load" if m[f"rst{L['r']}"] == ACTIVE else Ret(-4)

    @o.atomic("cursor_load", "_native.c pop_item: cur = LOAD(&r->cursor)")
    def po_cursor(m, L, x):
        L["cur"] = m[f"cur{L['r']}"]
        return "head_load"

    @o.atomic("head_load", "_native.c pop_item: cur >= LOAD(&q->head)")
    def po_head(m, L, x):
        if L["cur"] >= m["q.head"]:
            return "closed_load"
        return Call("take_item", {"r": L["r"], "cur": L["cur"]}, "took")  # :1044

    @o.atomic("closed_load", "_native.c pop_item: LOAD(&q->closed)")
    def po_closed(m, L, x):
        return "head_reload" if m["q.closed"] else Ret(-1)

    @o.atomic("head_reload", "_native.c pop_item: cur >= LOAD(&q->head)")
    def po_head_reload(m, L, x):
        return Ret(-2) if L["cur"] >= m["q.head"] else "state_load"

    @o.pure("took")
    def po_took(m, L, x):
        won, L["id"] = L["_r"]
        return "ledger_load" if won else "state_load"

    @o.atomic("ledger_load", "_native.c pop_item: *ledger")
    def po_ledger_load(m, L, x):
        L["held"] = m[ledger_key(x.me, lo(L["id"]))]
        return "ledger_store"

    @o.atomic("ledger_store", "_native.c pop_item: STORE(ledger, gen << 32 | count)")
    def po_ledger_store(m, L, x):
        gen, held = hi(L["id"]), L["held"]
        count = lo(held) + 1 if hi(held) == gen else 1
        m[ledger_key(x.me, lo(L["id"]))] = gen << 32 | count
        return Ret(L["id"])

    o = op("queue_join")  # args: policy, oldest -> reader index, -1 no free reader

    @o.pure("lock", "_native.c Queue_join: queue_lock")
    def jo_lock(m, L, x):
        L["idx"] = 0
        return Call("queue_lock", {}, "scan")

    @o.atomic("scan", "_native.c Queue_join: LOAD(&readers[index].state) != FREE")
    def jo_scan(m, L, x):
        if m[f"rst{L['idx']}"] == FREE_READER:
            return "head_load"
        L["idx"] += 1
        if L["idx"] == x.cfg.max_readers:
            L["result"] = -1
            return Call("queue_unlock", {}, "done")  # :1100-1102
        return "scan"

    @o.atomic("head_load", "_native.c Queue_join: head = q->head")
    def jo_head(m, L, x):
        L["head"] = L["cursor"] = m["q.head"]
        L["low"] = L["head"] - x.cfg.capacity if L["head"] > x.cfg.capacity else 0
        return "walk" if L["oldest"] else "fields"

    @o.pure("walk", "_native.c Queue_join: while cursor > low && add_queue_ref(ring[cursor - 1])")
    def jo_walk(m, L, x):
        return "ring_load" if L["cursor"] > L["low"] else "fields"

    @o.atomic("ring_load", "_native.c Queue_join: ring[(cursor - 1) & mask].id")
    def jo_ring_load(m, L, x):
        item = m[f"ring{(L['cursor'] - 1) & (x.cfg.capacity - 1)}"]
        return Call("add_queue_ref", {"id": item}, "walked")

    @o.pure("walked")
    def jo_walked(m, L, x):
        if not L["_r"]:
            return "fields"
        L["cursor"] -= 1
        return "walk"

    @o.atomic("fields", "_native.c Queue_join: r->policy, proc, pid, start_time, popped, joined_seq")
    def jo_fields(m, L, x):
        m[f"rpol{L['idx']}"] = POLICY_DROP if L["policy"] else POLICY_BLOCK
        m[f"rown{L['idx']}"] = x.me
        return "cursor_store"

    @o.atomic("cursor_store", "_native.c Queue_join: STORE(&r->cursor, cursor)")
    def jo_cursor(m, L, x):
        m[f"cur{L['idx']}"] = L["cursor"]
        if v.join_state_first:
            return "state_store"
        return "hw_store" if L["idx"] + 1 > m["q.hw"] else "state_store"  # the test reads readers_hw

    @o.atomic("hw_store", "_native.c Queue_join: STORE(&q->readers_hw, index + 1)")
    def jo_hw(m, L, x):
        m["q.hw"] = L["idx"] + 1
        return Call("queue_unlock", {}, "done") if v.join_state_first else "state_store"

    @o.atomic("state_store", "_native.c Queue_join: STORE(&r->state, ACTIVE)")
    def jo_state(m, L, x):
        m[f"rst{L['idx']}"] = ACTIVE
        L["result"] = L["idx"]
        if not v.join_state_first or L["idx"] + 1 <= m["q.hw"]:
            return Call("queue_unlock", {}, "done")
        return "hw_store"

    @o.pure("done")
    def jo_done(m, L, x):
        return Ret(L["result"])

    o = op("queue_detach")  # args: r -> references released

    @o.pure("lock", "_native.c Queue_detach: queue_lock")
    def de_lock(m, L, x):
        L["released"] = 0
        return Call("queue_lock", {}, "state_load")

    @o.atomic("state_load", "_native.c Queue_detach: LOAD(&r->state) == ACTIVE")
    def de_state(m, L, x):
        return "cursor_load" if m[f"rst{L['r']}"] == ACTIVE else Call("queue_unlock", {}, "done")

    @o.atomic("cursor_load", "_native.c Queue_detach: cur = LOAD(&r->cursor)")
    def de_cursor(m, L, x):
        L["cur"] = m[f"cur{L['r']}"]
        return "head_load"

    @o.atomic("head_load", "_native.c Queue_detach: cur >= q->head")
    def de_head(m, L, x):
        if L["cur"] >= m["q.head"]:
            return "state_store"
        return Call("take_item", {"r": L["r"], "cur": L["cur"]}, "took")

    @o.pure("took")
    def de_took(m, L, x):
        won, item = L["_r"]
        if not won:
            return "cursor_load"
        L["released"] += 1  # :1140 drop_queue_ref
        return Call("drop_refs", {"slot": lo(item), "gen": hi(item), "count": 1}, "cursor_load")

    @o.atomic("state_store", "_native.c Queue_detach: STORE(&r->state, FREE)")
    def de_state_store(m, L, x):
        m[f"rst{L['r']}"] = FREE_READER
        return Call("queue_unlock", {}, "done")

    @o.pure("done")
    def de_done(m, L, x):
        return Ret(L["released"])

    # ------------------------------------------------ the Python calls the programs make
    o = op("ALLOC")  # ShmManager.allocate: alloc, or sleep until a block is freed

    @o.pure("call", "manager.py allocate -> Context.alloc_buffer")
    def api_alloc(m, L, x):
        return Call("alloc_block", {}, "got")

    @o.pure("got")
    def api_alloc_got(m, L, x):
        return "wait_free" if L["_r"] == -1 else Ret(L["_r"])

    @o.atomic("wait_free", "manager.py _wait_for_free_block (sleeps on free_event)")
    def api_alloc_wait(m, L, x):
        return Call("alloc_block", {}, "got") if lo(m["pool.head"]) else BLOCK

    o = op("RELEASE")

    @o.pure("call", "Buffer.release -> release_ref")
    def api_release(m, L, x):
        return Call("release_ref", {"id": L["id"]}, "ret")

    o = op("ACQUIRE")

    @o.pure("call", "ShmManager.get -> Context.acquire")
    def api_acquire(m, L, x):
        return Call("acquire", {"id": L["id"]}, "ret")

    o = op("SEND")  # an id travels to the other process (a bus message, a pipe)

    @o.atomic("store", "message carrying the id")
    def api_send(m, L, x):
        m["mail"] = L["id"]
        return Ret(None)

    o = op("RECV")

    @o.atomic("wait", "message receive (gives up when the sender is dead)")
    def api_recv(m, L, x):
        if m["mail"] >= 0:
            return Ret(m["mail"])
        return Ret(None) if not alive(m, 1 - x.me) else BLOCK

    o = op("PUSH")  # PortQueue.push: push_buffer, wait for room while full

    @o.pure("call", "queue.py push -> push_buffer")
    def api_push(m, L, x):
        return Call("push_id", {"id": L["id"]}, "got")

    @o.pure("got")
    def api_push_got(m, L, x):
        if L["_r"] == 0:
            return "wait_space"
        if L["_r"] != 1:
            raise Violation(f"P{x.me} push of {L['id']:#x} returned {L['_r']}")
        return Ret(1)

    @o.atomic("wait_space", "queue.py _push_slow: wait(1) for room in every blocking reader")
    def api_push_wait(m, L, x):
        for i in range(m["q.hw"]):
            if (m[f"rst{i}"] == ACTIVE and m[f"rpol{i}"] == POLICY_BLOCK
                    and m["q.head"] - m[f"cur{i}"] >= x.cfg.capacity):
                return BLOCK
        return Call("push_id", {"id": L["id"]}, "got")

    o = op("POP")  # QueueReader.pop: pop_buffer, wait for data, mark a dead producer's queue abandoned

    @o.pure("call", "queue.py pop -> pop_buffer")
    def api_pop(m, L, x):
        return Call("pop_item", {"r": L["r"]}, "got")

    @o.pure("got")
    def api_pop_got(m, L, x):
        if L["_r"] == -1:
            return "wait_data"
        return Ret(L["_r"] if L["_r"] >= 0 else None)  # -2 closed, -4 detached: QueueClosedError

    @o.atomic("wait_data", "queue.py _pop_slow: wait(0); a dead producer: close(2) = CAS(&q->closed, 0, 2)")
    def api_pop_wait(m, L, x):
        r = L["r"]
        if m[f"rst{r}"] != ACTIVE or m[f"cur{r}"] < m["q.head"] or m["q.closed"]:
            return Call("pop_item", {"r": r}, "got")
        if not alive(m, x.cfg.producer):
            m["q.closed"] = 2
            return Call("pop_item", {"r": r}, "got")
        return BLOCK

    o = op("CLOSE")  # PortQueue.close by the producer

    @o.atomic("cas", "_native.c Queue_close: CAS(&q->closed, 0, 1) (then wakes everyone)")
    def api_close(m, L, x):
        if m["q.closed"] == 0:
            m["q.closed"] = 1
        return Ret(None)

    o = op("DETACH")

    @o.pure("call", "QueueReader.detach -> PortQueue._detach -> Queue.detach")
    def api_detach(m, L, x):
        return Call("queue_detach", {"r": L["r"]}, "ret")

    o = op("JOIN")

    @o.pure("call", "PortQueue.reader -> Queue.join")
    def api_join(m, L, x):
        return Call("queue_join", {"policy": L["policy"], "oldest": L["oldest"]}, "ret")

    o = op("RECLAIM")

    @o.pure("call", "manager.py _reap_locked -> Context.reclaim(dead)")
    def api_reclaim(m, L, x):
        return Call("reclaim", {"dead": L["dead"]}, "ret")

    o = op("REAP_READERS")  # PortQueue.reap_dead_readers

    @o.atomic("hw_load", "queue.py reap_dead_readers: readers[: header.readers_hw]")
    def api_rr_hw(m, L, x):
        L["hw"], L["i"] = m["q.hw"], 0
        return "next"

    @o.pure("next")
    def api_rr_next(m, L, x):
        return Ret(None) if L["i"] == L["hw"] else "check"

    @o.atomic("check", "queue.py reap_dead_readers: r.state == 1 and not is_alive(r.pid, r.start_time)")
    def api_rr_check(m, L, x):
        i = L["i"]
        L["i"] += 1
        if m[f"rst{i}"] == ACTIVE and not alive(m, m[f"rown{i}"]):
            return Call("queue_detach", {"r": i}, "next")
        return "next"

    for o in ops.values():  # every API op returns what its call returned
        if "ret" not in o.steps and o.name.isupper():
            o.pure("ret")(lambda m, L, x: Ret(L["_r"]))
    return ops


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Config:
    """A small world: a pool of `blocks` blocks, optionally one port queue, two programs.

    Program instructions (variables hold ids; see ``start_instruction``):
      ("alloc", v)  ("release", v)  ("acquire", v)  ("send", v)  ("recv", v)
      ("push", v)  ("pop", reader, v)  ("detach", reader)  ("join", drop_oldest, oldest, v)  ("close",)
    ``reader`` is a pre-joined reader's index or a variable set by "join".
    """

    name: str
    blocks: int
    programs: tuple
    capacity: int = 0                 # 0: no queue; else a power of two
    readers: tuple = ()               # pre-joined readers: (owner process, policy)
    max_readers: int = 1
    producer: int = 0
    victims: tuple = (0, 1)           # processes that may be killed

    @property
    def has_queue(self) -> bool:
        return self.capacity > 0


def start_instruction(ins: tuple, V: dict):
    """(API op, args) for an instruction, or None when it is skipped (its id is gone)."""
    kind = ins[0]

    def held(name):
        val = V.get(name)
        return val[0] if isinstance(val, tuple) and val[1] else None

    def reader(r):
        return r if isinstance(r, int) else V.get(r)

    if kind == "alloc":
        return "ALLOC", {}
    if kind == "recv":
        return "RECV", {}
    if kind == "release":
        return None if held(ins[1]) is None else ("RELEASE", {"id": held(ins[1])})
    if kind == "push":
        return None if held(ins[1]) is None else ("PUSH", {"id": held(ins[1])})
    if kind == "send":
        return None if held(ins[1]) is None else ("SEND", {"id": held(ins[1])})
    if kind == "acquire":
        val = V.get(ins[1])
        return None if val is None else ("ACQUIRE", {"id": val[0]})
    if kind in ("pop", "detach"):
        r = reader(ins[1])
        if r is None:
            return None
        return ("POP", {"r": r}) if kind == "pop" else ("DETACH", {"r": r})
    if kind == "join":
        return "JOIN", {"policy": ins[1], "oldest": ins[2]}
    if kind == "close":
        return "CLOSE", {}
    if kind == "reclaim":
        return "RECLAIM", {"dead": ins[1]}
    if kind == "reap_readers":
        return "REAP_READERS", {}
    raise ValueError(f"unknown instruction {ins!r}")


def finish_instruction(ins: tuple, V: dict, result) -> None:
    kind = ins[0]
    if kind == "alloc":
        V[ins[1]] = (result, True)
    elif kind == "release":
        if result < 0:
            raise Violation(f"release of {V[ins[1]][0]:#x}, which the program holds, returned {result}")
        V[ins[1]] = None
    elif kind == "acquire":
        V[ins[1]] = (V[ins[1]][0], True) if result == 0 else None
    elif kind == "recv":
        V[ins[1]] = None if result is None else (result, False)
    elif kind == "push":
        if result == 1:
            V[ins[1]] = None
    elif kind == "pop":
        V[ins[2]] = None if result is None else (result, True)
    elif kind == "join":
        V[ins[3]] = result if result >= 0 else None


# ------------------------------------------------------------------ the checker


class Outcome(NamedTuple):
    leaked_refs: int      # references counted in a state word that nobody holds any more
    leaked_blocks: int    # blocks with no reference that are not in the free list
    used_error: int       # pool.used minus the blocks really out of the free list

    def describe(self) -> str:
        parts = []
        if self.leaked_refs:
            parts.append(f"leaks {self.leaked_refs} ref" + ("s" if self.leaked_refs > 1 else ""))
        if self.leaked_blocks:
            parts.append(f"leaks {self.leaked_blocks} block" + ("s" if self.leaked_blocks > 1 else ""))
        if self.used_error:
            parts.append(f"used {self.used_error:+d}")
        return ", ".join(parts) or "clean"


CLEAN = Outcome(0, 0, 0)


@dataclass
class Result:
    config: str
    states: int
    end_states: int
    outcomes: set                           # every end state's Outcome
    deaths: dict                            # (operation, step) -> set of Outcome
    events: set = field(default_factory=set)  # notable interleavings that occurred


class Checker:
    """Explores every interleaving of a Config's two programs (and of one death, if asked)."""

    def __init__(self, cfg: Config, variant: Variant = Variant(), deaths: bool = False,
                 max_states: int = 2_000_000, ledger_bound: bool = True):
        """``ledger_bound=False`` drops the per-state check that ledgers never exceed counts, to
        see what breaking it leads to (a double free, a freed block still referenced)."""
        self.cfg, self.variant, self.deaths, self.max_states = cfg, variant, deaths, max_states
        self.ledger_bound = ledger_bound
        self.ops = build_ops(variant)
        self.events: set = set()
        n = cfg.blocks
        keys = ["pool.head", "pool.used", "g.free", "g.alive", "mail", "alive0", "alive1"]
        for s in range(n):
            keys += [f"st{s}", f"nx{s}", ledger_key(0, s), ledger_key(1, s)]
        if cfg.has_queue:
            keys += ["q.head", "q.lock", "q.closed", "q.hw"]
            keys += [f"ring{i}" for i in range(cfg.capacity)]
            for r in range(cfg.max_readers):
                keys += [f"cur{r}", f"rst{r}", f"rpol{r}", f"rown{r}"]
        self.keys = keys

    # ---- states: (memory tuple, (worker0, worker1, reaper), death point or None)
    # a process: (status, pc, vars, frames); status run | done | dead | idle (the reaper before a death)
    # a frame: (op, label, locals)

    def initial(self):
        cfg, n = self.cfg, self.cfg.blocks
        m = dict.fromkeys(self.keys, 0)
        m["pool.head"] = n << 32 | 1  # push_free pushed the n slots in reverse: n CASes, slot 0 on top
        for s in range(n):
            m[f"nx{s}"] = s + 2 if s + 1 < n else 0
        m["g.free"], m["g.alive"], m["mail"] = frozenset(range(n)), frozenset(), -1
        m["alive0"] = m["alive1"] = 1
        for r, (owner, policy) in enumerate(cfg.readers):
            m[f"rst{r}"], m[f"rpol{r}"], m[f"rown{r}"] = ACTIVE, policy, owner
        if cfg.has_queue:
            m["q.hw"] = len(cfg.readers)
        procs = []
        for p in (0, 1):
            V = {}
            for ins in cfg.programs[p]:
                for name in ins[1:]:
                    if isinstance(name, str):
                        V.setdefault(name, None)
            procs.append(self._settle(p, m, "run", 0, V, [], None))
        procs.append(("idle", 0, (), ()))
        return (self._freeze(m), tuple(procs), None)

    def _freeze(self, m):
        return tuple(m[k] for k in self.keys)

    def _thaw(self, mem):
        return dict(zip(self.keys, mem, strict=True))

    def program(self, p: int, dead: int | None):
        """A worker's program; the reaper's: reclaim the dead row, then detach its readers."""
        if p != REAPER:
            return self.cfg.programs[p]
        return (("reclaim", dead),) + ((("reap_readers",),) if self.cfg.has_queue else ())

    def _settle(self, p, m, status, pc, V, frames, ctrl, dead=None):
        """Run pure steps, calls and returns until an atomic step is pending (or the program ends)."""
        x = X(p, self.cfg, self.variant, self.events)
        prog = self.program(p, dead)
        while True:
            if ctrl is None:  # start the next instruction
                while pc < len(prog):
                    start = start_instruction(prog[pc], V)
                    if start is not None:
                        break
                    pc += 1
                else:
                    return ("done", pc, tuple(sorted(V.items())), ())
                opname, args = start
                frames.append([opname, self.ops[opname].entry, dict(args)])
                ctrl = self.ops[opname].entry
            if isinstance(ctrl, Call):
                frames[-1][2]["_ret"] = ctrl.ret
                frames.append([ctrl.op, self.ops[ctrl.op].entry, dict(ctrl.args)])
                ctrl = self.ops[ctrl.op].entry
            elif isinstance(ctrl, Ret):
                frames.pop()
                if frames:
                    L = frames[-1][2]
                    L["_r"] = ctrl.value
                    ctrl = L.pop("_ret")
                else:
                    finish_instruction(prog[pc], V, ctrl.value)
                    pc += 1
                    ctrl = None
                    continue
            if isinstance(ctrl, str):
                if ctrl == BLOCK:
                    raise Violation(f"P{p}: a pure step blocked in {frames[-1][0]}")
                frame = frames[-1]
                frame[1] = ctrl
                step = self.ops[frame[0]].steps[ctrl]
                if not step.pure:
                    frozen = tuple((op, label, tuple(sorted(L.items()))) for op, label, L in frames)
                    return (status, pc, tuple(sorted(V.items())), frozen)
                ctrl = step.fn(None, frame[2], x)

    def pending(self, proc) -> tuple[str, str]:
        """(operation, step) a process is about to run: the death point if it is killed now."""
        status, pc, _V, frames = proc
        if not frames:
            return ("end", "")
        path = "/".join(op for op, _label, _L in frames[1:])
        return (frames[0][0].lower(), f"{path}:{frames[-1][1]}" if path else frames[-1][1])

    def step(self, state, p):
        """Run process p's pending atomic step: the next state, or None if it waits."""
        mem, procs, died = state
        status, pc, Vt, frames_t = procs[p]
        m = self._thaw(mem)
        frames = [[op, label, dict(L)] for op, label, L in frames_t]
        V = dict(Vt)
        op, label, L = frames[-1]
        ctrl = self.ops[op].steps[label].fn(m, L, X(p, self.cfg, self.variant, self.events))
        if ctrl == BLOCK:
            return None
        new = self._settle(p, m, status, pc, V, frames, ctrl, died[0] if died else None)
        procs = procs[:p] + (new,) + procs[p + 1:]
        return (self._freeze(m), procs, died)

    def kill(self, state, p):
        mem, procs, died = state
        m = self._thaw(mem)
        m[f"alive{p}"] = 0
        point = self.pending(procs[p])
        reaper = self._settle(REAPER, m, "run", 0, {}, [], None, p)
        procs = list(procs)
        procs[p] = ("dead", 0, (), ())
        procs[REAPER] = reaper
        return (self._freeze(m), tuple(procs), (p, point))

    def successors(self, state):
        _mem, procs, died = state
        for p, proc in enumerate(procs):
            if proc[0] == "run":
                desc = f"P{p} {self.describe_step(proc)}"
                try:
                    nxt = self.step(state, p)
                except Violation as e:
                    e.message = e.args[0] + f"\n  in the step: {desc}"
                    raise
                if nxt is not None:
                    yield desc, nxt
        if self.deaths and died is None:
            for p in self.cfg.victims:
                if procs[p][0] in ("run", "done"):
                    yield f"P{p} KILLED before {self.pending(procs[p])}", self.kill(state, p)

    def describe_step(self, proc) -> str:
        _status, _pc, _V, frames = proc
        op, label, _L = frames[-1]
        return f"{'/'.join(f[0] for f in frames)}:{label}  [{self.ops[op].steps[label].where}]"

    # ---- invariants

    def queue_refs(self, m):
        """(slot, gen) -> references the queue holds: one per unread item per active reader."""
        refs: dict = {}
        if not self.cfg.has_queue:
            return refs
        cap = self.cfg.capacity
        for r in range(self.cfg.max_readers):
            if m[f"rst{r}"] != ACTIVE:
                continue
            cur, head = m[f"cur{r}"], m["q.head"]
            if head - cur > cap or cur > head:
                raise Violation(f"reader {r}: cursor {cur} and head {head} are more than a ring apart")
            for seq in range(cur, head):
                item = m[f"ring{seq & (cap - 1)}"]
                refs[(lo(item), hi(item))] = refs.get((lo(item), hi(item)), 0) + 1
        return refs

    def free_list(self, m) -> list[int]:
        out, seen, top = [], set(), lo(m["pool.head"])
        while top:
            slot = top - 1
            if slot >= self.cfg.blocks or slot in seen:
                raise Violation(f"the free list loops or leaves the pool at slot {slot}: {out}")
            seen.add(slot)
            out.append(slot)
            top = m[f"nx{slot}"]
        return out

    def check_state(self, state):
        """Invariants of every reachable state."""
        mem, procs, died = state
        m = self._thaw(mem)
        n = self.cfg.blocks
        free = self.free_list(m)
        if set(free) != m["g.free"]:
            raise Violation(f"the free list {free} lost or gained blocks: the pushes and pops "
                            f"leave {sorted(m['g.free'])} free")
        for s in free:
            if lo(m[f"st{s}"]) != 0:
                raise Violation(f"slot {s} is in the free list with state {m[f'st{s}']:#x} (count > 0)")
        qrefs = self.queue_refs(m)
        for s in range(n):
            st = m[f"st{s}"]
            gen, count = hi(st), lo(st)
            if (count > 0) != ((s, gen) in m["g.alive"]):
                raise Violation(f"slot {s}: state {st:#x} disagrees with the live allocations")
            refs = 0
            for p in (0, 1):
                if procs[p][0] == "dead":
                    continue  # its row is what reclaim will release
                held = m[ledger_key(p, s)]
                if lo(held) == 0:
                    continue
                if hi(held) == gen:
                    refs += lo(held)
                elif self.ledger_bound and not self._publishing(procs[p], s, hi(held)):
                    raise Violation(f"P{p}'s ledger holds {lo(held)} of generation {hi(held)} of slot {s}, "
                                    f"which is at {st:#x}: a freed or reused block is still referenced")
            for (slot, g), k in qrefs.items():
                if slot == s and k:
                    if g != gen or count == 0:
                        raise Violation(f"the queue holds id {g << 32 | s:#x} but slot {s} is at {st:#x}")
                    refs += k
            if refs > count and self.ledger_bound:
                raise Violation(f"slot {s}: {refs} references are held (ledgers + queue) but its count "
                                f"is {count}: a release went below what others hold")
        for p in (0, 1):
            self.check_holdings(m, procs[p])
        if died is None and all(not proc[3] for proc in procs):
            self.check_quiescent(m, procs, free, qrefs)

    def check_holdings(self, m, proc):
        """What a program holds is alive: no process can use a block that was freed under it.

        (The ids the running instruction works on are in transit: a push hands its reference
        to the queue before it returns, a release frees before it returns.)"""
        status, pc, Vt, frames = proc
        if status == "dead":
            return
        busy = {value for key, value in frames[0][2] if key == "id"} if frames else set()
        for name, val in Vt:
            if isinstance(val, tuple) and val[1] and val[0] not in busy:
                if (lo(val[0]), hi(val[0])) not in m["g.alive"]:
                    raise Violation(f"the program holds {val[0]:#x} in {name!r} but that allocation is "
                                    f"over (slot {lo(val[0])} is at {m[f'st{lo(val[0])}']:#x}): "
                                    "a block was freed under its holder")

    def _publishing(self, proc, slot, gen) -> bool:
        """Is this process inside alloc between its ledger store and its publish of `slot`?"""
        frames = proc[3]
        if not frames or frames[-1][0] != "alloc_block" or frames[-1][1] != "publish":
            return False
        L = dict(frames[-1][2])
        return L["slot"] == slot and L["gen"] == gen

    def check_quiescent(self, m, procs, free, qrefs):
        """No death and nobody inside an operation: every count is exactly accounted for."""
        outcome = self.account(m, procs, free, qrefs)
        if outcome != CLEAN:
            raise Violation(f"between operations, with no death: {outcome.describe()}")

    def account(self, m, procs, free, qrefs) -> Outcome:
        leaked_refs = leaked_blocks = 0
        for s in range(self.cfg.blocks):
            gen, count = hi(m[f"st{s}"]), lo(m[f"st{s}"])
            refs = qrefs.get((s, gen), 0)
            for p in (0, 1):
                held = m[ledger_key(p, s)]
                if procs[p][0] != "dead" and hi(held) == gen:
                    refs += lo(held)
            if refs > count:
                raise Violation(f"slot {s} is at {m[f'st{s}']:#x} but {refs} references of it are held: "
                                "a freed (or reused) block is still referenced")
            leaked_refs += count - refs
            if count == 0 and s not in free:
                leaked_blocks += 1
        used_error = m["pool.used"] - (self.cfg.blocks - len(free))
        for p in (0, 1):
            if procs[p][0] == "dead":
                continue
            expect: dict = {}
            for val in dict(procs[p][2]).values():
                if isinstance(val, tuple) and val[1]:
                    expect[lo(val[0])] = (hi(val[0]), expect.get(lo(val[0]), (0, 0))[1] + 1)
            for s in range(self.cfg.blocks):
                held = m[ledger_key(p, s)]
                got = (hi(held), lo(held)) if lo(held) else None
                if got != expect.get(s):
                    raise Violation(f"P{p} holds {expect.get(s)} of slot {s} by its program, its ledger "
                                    f"says {got}")
        return Outcome(leaked_refs, leaked_blocks, used_error)

    def outcome(self, state) -> Outcome:
        """An end state (workers done or dead, reaper done): check it and classify it."""
        mem, procs, died = state
        m = self._thaw(mem)
        free = self.free_list(m)
        qrefs = self.queue_refs(m)
        if died is not None:
            dead = died[0]
            row = [m[ledger_key(dead, s)] for s in range(self.cfg.blocks)]
            if any(row):
                raise Violation(f"the dead P{dead}'s ledger row was not cleared: {row}")
            if self.cfg.has_queue:
                for r in range(self.cfg.max_readers):
                    if m[f"rst{r}"] == ACTIVE and m[f"rown{r}"] == dead:
                        raise Violation(f"the dead P{dead}'s reader {r} was not detached")
        if self.cfg.has_queue and m["q.lock"] and alive(m, m["q.lock"] - 1):
            raise Violation(f"the queue lock is left held by the live P{m['q.lock'] - 1}")
        return self.account(m, procs, free, qrefs)

    # ---- exploration

    def is_end(self, state) -> bool:
        procs = state[1]
        return all(p[0] in ("done", "dead") for p in procs[:2]) and procs[REAPER][0] in ("idle", "done")

    def run(self) -> Result:
        init = self.initial()
        parent: dict = {init: None}
        queue = deque([init])
        outcomes: set = set()
        deaths: dict = {}
        ends = 0
        while queue:
            state = queue.popleft()
            try:
                self.check_state(state)
                if self.is_end(state):
                    ends += 1
                    out = self.outcome(state)
                    outcomes.add(out)
                    if state[2] is not None:
                        deaths.setdefault(state[2][1], set()).add(out)
                    elif out != CLEAN:
                        raise Violation(f"an end state with no death is not clean: {out.describe()}")
                progressed = False
                for desc, nxt in self.successors(state):
                    if "KILLED" not in desc:
                        progressed = True
                    if nxt not in parent:
                        parent[nxt] = (state, desc)
                        queue.append(nxt)
                if not progressed and not self.is_end(state):
                    waiting = [f"P{p} at {self.pending(proc)}" for p, proc in enumerate(state[1])
                               if proc[0] == "run"]
                    raise Violation("deadlock: every live process waits: " + "; ".join(waiting))
            except Violation as e:
                e.trace = self.trace(parent, state)
                raise
            except Exception as e:  # a model bug: show where
                raise Violation(f"{type(e).__name__}: {e}", self.trace(parent, state)) from e
            if len(parent) > self.max_states:
                raise RuntimeError(f"{self.cfg.name}: more than {self.max_states} states")
        return Result(self.cfg.name, len(parent), ends, outcomes, deaths, self.events)

    def trace(self, parent, state) -> list[str]:
        steps = []
        while parent.get(state) is not None:
            state, desc = parent[state]
            steps.append(desc)
        return steps[::-1]


def explore(cfg: Config, variant: Variant = Variant(), deaths: bool = False, **kw) -> Result:
    return Checker(cfg, variant, deaths, **kw).run()


# ------------------------------------------------------------------ the configurations the tests use


CONFIGS = {
    # one process allocates, shares the id, releases, allocates again (the same slot, one
    # generation on); the other acquires the id it was sent -- fresh or already stale
    "share": Config(
        "share", blocks=2,
        programs=(
            (("alloc", "a"), ("send", "a"), ("release", "a"), ("alloc", "b"), ("release", "b")),
            (("recv", "x"), ("acquire", "x"), ("release", "x")),
        )),
    # concurrent pops and pushes on a 3-block free list: the ABA pattern (one process pops
    # A, B and pushes A back while the other sits between reading A's next and its CAS)
    "aba": Config(
        "aba", blocks=3,
        programs=(
            (("alloc", "a"), ("alloc", "b"), ("release", "a"), ("release", "b")),
            (("alloc", "c"), ("release", "c")),
        )),
    # producer -> capacity-1 queue -> a blocking reader: push waits for room, pop moves the
    # queue's reference into the reader's ledger, detach at the end
    "queue": Config(
        "queue", blocks=2, capacity=1, readers=((1, POLICY_BLOCK),),
        programs=(
            (("alloc", "a"), ("push", "a"), ("alloc", "b"), ("push", "b")),
            (("pop", 0, "x"), ("release", "x"), ("pop", 0, "y"), ("release", "y"), ("detach", 0)),
        )),
    # drop_oldest reader: the producer's drop of the oldest item races the reader's pop
    # (both CAS the cursor; the winner owns the item's reference)
    "drop": Config(
        "drop", blocks=2, capacity=1, readers=((1, POLICY_DROP),),
        programs=(
            (("alloc", "a"), ("push", "a"), ("alloc", "b"), ("push", "b")),
            (("pop", 0, "x"), ("release", "x"), ("detach", 0)),
        )),
    # multicast: two readers (both of process 1) each get a reference of the one item
    "multicast": Config(
        "multicast", blocks=1, capacity=1, readers=((1, POLICY_BLOCK), (1, POLICY_BLOCK)),
        max_readers=2,
        programs=(
            (("alloc", "a"), ("push", "a")),
            (("pop", 0, "x"), ("pop", 1, "y"), ("release", "x"), ("release", "y"),
             ("detach", 0), ("detach", 1)),
        )),
    # join(start="oldest") walking back over an item the producer's own reader still holds
    "join": Config(
        "join", blocks=2, capacity=2, readers=((0, POLICY_DROP),), max_readers=2,
        programs=(
            (("alloc", "a"), ("push", "a"), ("close",), ("pop", 0, "x"), ("release", "x"), ("detach", 0)),
            (("join", 1, True, "r"), ("pop", "r", "y"), ("release", "y"), ("detach", "r")),
        )),
}


def death_table(results) -> list[tuple[str, str, str, str]]:
    """Rows (config, operation, step, outcomes) of every death point of the results."""
    rows = []
    for res in results:
        for (op, step), outs in sorted(res.deaths.items()):
            text = " | ".join(sorted(o.describe() for o in outs))
            rows.append((res.config, op, step, text))
    return rows


def merged_death_table(results) -> dict:
    """(operation, step) -> set of outcome descriptions, over every config."""
    table: dict = {}
    for res in results:
        for point, outs in res.deaths.items():
            table.setdefault(point, set()).update(o.describe() for o in outs)
    return table


def format_table(table: dict) -> str:
    width = max((len(op) + len(step) for op, step in table), default=10) + 4
    lines = [f"{'killed before: operation  step':<{width}}outcome"]
    for (op, step), outs in sorted(table.items()):
        lines.append(f"{op + '  ' + step:<{width}}{' | '.join(sorted(outs))}")
    return "\n".join(lines)


def main(argv=None) -> int:  # pragma: no cover - a command-line view of the tables
    import time

    names = (argv or sys.argv[1:]) or list(CONFIGS)
    results = []
    for name in names:
        t0 = time.perf_counter()
        res = explore(CONFIGS[name], deaths=True)
        print(f"{name}: {res.states} states, {res.end_states} end states, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results.append(res)
    print(format_table(merged_death_table(results)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
