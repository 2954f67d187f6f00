"""Model checking of the shared-memory protocols (issue 7): the free list, reference counts,
hold ledger, crash reclaim and port-queue cursors of ``_native.c``, every interleaving of two
processes, and the same with one of them killed before any of its steps.

The model is ``tests/protocol_model.py`` (one step = one memory action of the C code, in its
order; ``python tests/protocol_model.py`` prints the death-point table).  If the C code
changes order, change the operation there, then the expected windows below.
"""


import protocol_model as pm
import pytest

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.stream import PortQueue

# The configurations whose death points the table below covers (``join`` is apart: see the
# readers_hw tests at the end).
CORE = ("share", "aba", "queue", "drop", "multicast")

# Death points (killed BEFORE this step of this operation) whose end state is not clean,
# with every outcome they can end in (other interleavings of the same point may be clean).
# Every other death point of CORE is clean in every interleaving.
DOCUMENTED_WINDOWS = {
    # docs/shm.md "Known windows": between the pop and the ledger write of an allocation ...
    ("alloc", "alloc_block:used_add"): {"leaks 1 block, used -1"},
    ("alloc", "alloc_block:load_gen"): {"leaks 1 block"},
    ("alloc", "alloc_block:ledger_store"): {"leaks 1 block"},
    # ... between the CAS and the ledger write of a get ...
    ("acquire", "acquire:ledger_load"): {"leaks 1 ref"},
    ("acquire", "acquire:ledger_store"): {"leaks 1 ref"},
    # ... between the ledger write and the CAS of a release ...
    ("release", "release_ref/drop_refs:load"): {"leaks 1 ref"},
    ("release", "release_ref/drop_refs:cas"): {"leaks 1 ref"},
    # ... and `used` off by one after a kill inside free_block (between the push and the count)
    ("release", "release_ref/drop_refs/free_block:used_sub"): {"used +1"},
    ("push", "push_id/drop_refs/free_block:used_sub"): {"used +1"},
    ("detach", "queue_detach/drop_refs/free_block:used_sub"): {"used +1"},
}
UNDOCUMENTED_WINDOWS = {
    # free_block killed after the count reached 0 but before the push CAS: the block is
    # neither referenced nor free (docs/shm.md only mentions `used` being off by one there)
    **{(op, f"{path}/drop_refs/free_block/freelist_push:{step}"): {"leaks 1 block"}
       for op, path in (("release", "release_ref"), ("push", "push_id"), ("detach", "queue_detach"))
       for step in ("load_head", "store_next", "cas")},
    # pop: between the cursor CAS (the queue's reference is taken) and the ledger store
    ("pop", "pop_item:ledger_load"): {"leaks 1 ref"},
    ("pop", "pop_item:ledger_store"): {"leaks 1 ref"},
    # push: after the ledger store (the producer's reference is in flight) until head is
    # published; after the multicast fetch_add it is one reference PER READER (2 here)
    ("push", "push_id:fetch_add"): {"leaks 1 ref"},
    ("push", "push_id:ring_store"): {"leaks 1 ref", "leaks 2 refs"},
    ("push", "push_id:head_store"): {"leaks 1 ref", "leaks 2 refs"},
    # push dropping a drop_oldest reader's oldest item, detach releasing unread items:
    # between take_item's cursor CAS and drop_refs' CAS
    ("push", "push_id/drop_refs:load"): {"leaks 1 ref"},
    ("push", "push_id/drop_refs:cas"): {"leaks 1 ref"},
    ("detach", "queue_detach/drop_refs:load"): {"leaks 1 ref"},
    ("detach", "queue_detach/drop_refs:cas"): {"leaks 1 ref"},
}
EXPECTED_WINDOWS = {**DOCUMENTED_WINDOWS, **UNDOCUMENTED_WINDOWS}


@pytest.fixture(scope="module")
def death_results():
    """Every interleaving of every CORE config with each process killed before each step."""
    return {name: pm.explore(pm.CONFIGS[name], deaths=True) for name in CORE}


def windows(results) -> dict:
    """(operation, step) -> its non-clean outcomes, for death points that have any."""
    table = pm.merged_death_table(results)
    return {point: outs - {"clean"} for point, outs in table.items() if outs - {"clean"}}


# ------------------------------------------------------------------ no death


@pytest.mark.parametrize("name", list(pm.CONFIGS))
def test_every_interleaving_of_two_processes_ends_clean(name):
    """No invariant breaks in any reachable state, no deadlock, and every end state has every
    block free or held exactly as the programs say (count == ledgers + queue references)."""
    result = pm.explore(pm.CONFIGS[name])
    assert result.end_states > 0
    assert result.outcomes == {pm.CLEAN}
    assert result.deaths == {}


@pytest.mark.parametrize(("name", "event"), [
    ("aba", "pop CAS failed on the tag alone (ABA averted)"),
    ("share", "acquire of a stale id refused on a reused slot"),
    ("drop", "take_item lost the cursor CAS (pop against drop or detach)"),
])
def test_the_interesting_races_are_among_the_interleavings(name, event):
    """The exploration reaches the races the protocols exist for: a pop whose head came back
    with the same slot (ABA) fails on the tag, a stale id meets its slot reused at the next
    generation, a reader's pop and the producer's drop of the same item race on the cursor."""
    assert event in pm.explore(pm.CONFIGS[name]).events


# ------------------------------------------------------------------ one death


def test_death_points_that_leak_are_exactly_the_known_windows(death_results):
    found = windows(death_results.values())
    print("\n" + pm.format_table(pm.merged_death_table(death_results.values())))
    assert found == EXPECTED_WINDOWS, (
        f"new windows: {sorted(set(found) - set(EXPECTED_WINDOWS))}; "
        f"closed: {sorted(set(EXPECTED_WINDOWS) - set(found))}; "
        f"changed: {sorted(p for p in found if p in EXPECTED_WINDOWS and found[p] != EXPECTED_WINDOWS[p])}")


def test_every_death_leaks_at_most_one_block_and_one_reference_per_reader(death_results):
    """A kill anywhere costs at most one block (or one reference; one per reader for a
    multicast push) and `used` off by one; never a double free or a freed block still
    referenced (those raise Violation while exploring, in every state)."""
    for name, result in death_results.items():
        readers = max(len(pm.CONFIGS[name].readers), 1)
        for point, outcomes in result.deaths.items():
            for out in outcomes:
                assert out.leaked_blocks <= 1, (name, point, out)
                assert out.leaked_refs <= (readers if point[0] == "push" else 1), (name, point, out)
                assert abs(out.used_error) <= 1, (name, point, out)
                assert not (out.leaked_blocks and out.leaked_refs), (name, point, out)


def test_both_processes_die_at_every_step_and_the_survivor_finishes(death_results):
    """Each death point of each program is explored (the reaper then reclaims the dead row
    and detaches its readers while the survivor finishes); dying before a program's first
    step and after its last are clean."""
    points = set().union(*(r.deaths for r in death_results.values()))
    for op in ("alloc", "release", "acquire", "push", "pop", "detach", "send", "recv"):
        assert any(p[0] == op for p in points), op
    assert ("end", "") in points
    assert ("alloc", "alloc_block/freelist_pop:load_head") in points  # before the very first step
    for result in death_results.values():
        assert result.deaths[("end", "")] == {pm.CLEAN}


def test_the_reaper_returns_a_popped_block_that_was_never_published(death_results):
    """reclaim()'s rule for a ledger at gen + 1 over a slot still at gen is exercised (a
    death between the ledger store and the publish of an alloc), and that point is clean."""
    event = "reclaim returned a block the dead process popped but never published"
    assert event in death_results["aba"].events
    assert death_results["aba"].deaths[("alloc", "alloc_block:publish")] == {pm.CLEAN}


def test_a_dead_queue_lock_holder_is_stolen_from(death_results):
    assert "queue lock stolen from a dead holder" in death_results["queue"].events


# ------------------------------------------------------------------ the checker has teeth


def test_checker_finds_aba_in_a_free_list_without_the_tag():
    with pytest.raises(pm.Violation, match="lost or gained blocks|not free|double free") as info:
        pm.explore(pm.CONFIGS["aba"], pm.Variant(no_tag=True))
    assert any("freelist_pop:cas" in step for step in info.value.trace)


def test_checker_finds_a_release_that_drops_the_count_before_the_ledger():
    # the invariant "a ledger never holds more than the count" breaks at once ...
    with pytest.raises(pm.Violation, match="references are held"):
        pm.explore(pm.CONFIGS["share"], pm.Variant(release_count_first=True))
    # ... and without that check, a death between the two steps makes the reaper drop the
    # reference again: the other holder's block is freed under it
    with pytest.raises(pm.Violation, match="returned -1|freed under its holder|still referenced") as info:
        pm.explore(pm.CONFIGS["share"], pm.Variant(release_count_first=True), deaths=True, ledger_bound=False)
    assert any("KILLED before ('release', 'release_ref:ledger_store')" in s for s in info.value.trace)


def test_checker_finds_an_acquire_without_the_generation_check():
    with pytest.raises(pm.Violation, match="stale id took a reference"):
        pm.explore(pm.CONFIGS["share"], pm.Variant(acquire_no_gen=True))


# ------------------------------------------------------------------ join and readers_hw

JOIN_WINDOWS = {
    # killed after add_queue_ref took the walked-back items' references, before the reader is
    # active: they leak (one per walked item; one here)
    ("join", "queue_join:fields"): {"leaks 1 ref"},
    ("join", "queue_join:cursor_store"): {"leaks 1 ref"},
    ("join", "queue_join:hw_store"): {"leaks 1 ref"},
    ("join", "queue_join:state_store"): {"leaks 1 ref"},
}


def test_a_joiner_killed_anywhere_leaks_only_the_references_it_walked():
    """Join raises readers_hw, then marks the reader ACTIVE (_native.c Queue_join): a death
    anywhere in it is safe; its only windows leak the start="oldest" walk's references."""
    result = pm.explore(pm.CONFIGS["join"], deaths=True)
    found = windows([result])
    assert {p: o for p, o in found.items() if p[0] == "join"} == JOIN_WINDOWS
    assert {p for p in found if p[0] != "join"} <= set(EXPECTED_WINDOWS)


def test_checker_finds_the_reader_hidden_by_marking_it_active_before_readers_hw():
    """The order join had before this checker found it: killed between the two stores, an
    ACTIVE reader sits beyond readers_hw, where pushes take no reference for it and a later
    reap drops references it never held (a block still queued for another reader is freed)."""
    with pytest.raises(pm.Violation):
        pm.explore(pm.CONFIGS["join"], pm.Variant(join_state_first=True), deaths=True)


def test_a_reader_slot_left_free_inside_readers_hw_is_harmless(domain):
    """The real library, in the state a joiner killed between its two stores now leaves:
    readers_hw raised over a slot still FREE.  Pushes, joins and reaps go on exactly."""
    m = ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 64, 4)]), reaper_interval=None)
    try:
        q = PortQueue(m, "q", capacity=4, max_readers=3)
        r0 = q.reader("block")  # index 0
        q._header.readers_hw = 2  # what the killed joiner of slot 1 wrote before dying
        b = m.allocate(8)
        item = b.id
        q.push(b)
        assert m._ctx.ref_count(item) == 1  # one reference, for reader 0 only
        later = q.reader("block")  # takes the free slot 1
        assert later.index == 1
        q.reap_dead_readers()
        assert m._ctx.ref_count(item) == 1
        r0.pop(timeout=5).release()
        assert m._ctx.ref_count(item) == -1  # freed by its last holder, once
        later.detach()
    finally:
        m.shutdown(unlink=True)
