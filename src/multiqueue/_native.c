/*
 * multiqueue._native: the few things Python cannot do on shared memory.
 *
 *   - atomic load / store / add / compare-exchange on words of a shared mapping,
 *   - futex wait / wake on a shared word (sleeping in the kernel, GIL released),
 *   - the hot buffer operations built on them (Context.alloc / acquire / release),
 *     one C call each, so an allocate+release pair costs two calls from Python,
 *   - crash reclaim of a dead process's references (Context.reclaim).
 *
 * Everything else (naming, segments, registry, stats, policy) lives in Python.
 * The shared structures below are mirrored by ctypes in multiqueue/shm/layout.py;
 * layout() exports their sizes and offsets so a test can check both agree.
 *
 * Buffer ids are  generation << 32 | slot.  The metadata entry's `state` word holds
 * generation << 32 | reference count, so "take a reference if this id is still
 * valid" is a single compare-exchange and a stale id can never touch a reused slot.
 *
 * Crash windows.  Every reference a process holds is recorded in its ledger row
 * (one 64-bit word per slot: generation << 32 | count).  Orders are chosen so that a
 * process killed between two steps can at worst leak (one block or reference; a queue
 * push one reference per reader) and never frees a block twice (every death point is
 * explored by tests/protocol_model.py):  acquire = CAS the count up, then ledger up; release = ledger down,
 * then CAS the count down; alloc = pop, ledger (gen+1, 1), then publish the state.
 * A dead process whose ledger names generation g+1 of a slot still at g with count 0
 * popped that block but never published it: reclaim() pushes it back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <math.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdint.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- layout */

#define MQ_SIZE_BUCKETS 48  /* histogram of requested sizes: bucket = bit length */
#define MQ_MAX_CHUNKS 32    /* segments per pool (the first plus expansions) */
#define MQ_POOL_ACTIVE 1

typedef struct {             /* 64 bytes at the start of every segment */
    uint64_t magic;
    uint32_t version;
    uint32_t kind;
    uint32_t creator_pid;
    uint32_t header_size;
    uint64_t creator_start;  /* creator's start time, clock ticks since boot */
    int64_t created_ns;      /* CLOCK_REALTIME */
    uint64_t total_size;
    uint64_t reserved[2];
} mq_segment_header;

typedef struct {             /* per-process counters, summed for domain stats */
    uint64_t alloc_count;
    uint64_t dealloc_count;
    uint64_t failed_count;
    uint64_t latency_sum_ns;
    uint64_t latency_max_ns;
    uint64_t reserved[3];
    uint64_t size_hist[MQ_SIZE_BUCKETS];
} mq_stats;

typedef struct {             /* the domain's control segment starts with this */
    mq_segment_header seg;
    uint32_t max_processes;
    uint32_t max_pools;
    uint32_t max_buffers;
    uint32_t slots_used;     /* metadata slots handed out to pools (bump) */
    uint64_t pools_epoch;    /* bumped when pools are added, grown or removed */
    uint64_t procs_offset;
    uint64_t pools_offset;
    uint64_t meta_offset;
    uint64_t ledger_offset;
    char name_prefix[32];
    uint64_t reserved[5];
    /* own cache line: futex word bumped when a block is freed while someone waits */
    uint32_t free_event;
    uint32_t alloc_waiters;
    uint64_t reserved2[7];
    mq_stats retired;        /* counters of processes that have left or were reaped */
} mq_control;

typedef struct {             /* one registered process */
    uint32_t pid;
    uint32_t state;
    uint64_t start_time;
    int64_t heartbeat_ns;
    int64_t registered_ns;
    char name[32];
    mq_stats stats;
    uint32_t incarnation;    /* bumped each time the slot is registered: see lock_id */
    uint32_t reserved32;
    uint64_t reserved[7];    /* to a multiple of 64 bytes: the pool records after stay line-aligned */
} mq_process;

_Static_assert(sizeof(mq_process) % 64 == 0, "process records keep the pool table cache-line aligned");

typedef struct {
    uint32_t first_slot;
    uint32_t count;
} mq_chunk;

typedef struct {             /* one pool; hot words each on their own cache line */
    uint64_t head;           /* free list: tag << 32 | (slot + 1), 0 = empty */
    uint64_t pad0[7];
    uint64_t used;
    uint64_t high_water;
    uint64_t token;          /* random per incarnation; part of the segment names */
    uint64_t pad1[5];
    uint32_t state;
    uint32_t n_chunks;
    uint64_t block_size;
    uint64_t stride;
    uint32_t block_count;
    uint32_t initial_count;
    uint32_t max_blocks;
    uint32_t expandable;
    char name[32];
    mq_chunk chunks[MQ_MAX_CHUNKS];
    uint8_t pad2[56];        /* to 512 bytes, so every pool's head starts a cache line */
} mq_pool;

typedef struct {             /* one buffer's metadata; a slot per pool block */
    uint64_t state;          /* generation << 32 | reference count */
    uint32_t next_free;      /* free-list link: next slot + 1, 0 = end */
    uint16_t pool_id;
    uint16_t chunk;
    uint32_t block_index;
    uint32_t flags;          /* MQ_HAS_RANGE */
    uint64_t size;           /* requested size of the current allocation */
    uint64_t data_offset;    /* payload offset inside the chunk's segment */
    int64_t timestamp_ns;
    int64_t range_start_ns;
    int64_t range_end_ns;
    int64_t alloc_time_ns;
    uint32_t creator_proc;
    uint32_t creator_pid;
    uint64_t reserved[6];
} mq_entry;

_Static_assert(sizeof(mq_segment_header) == 64, "segment header is 64 bytes");
_Static_assert(sizeof(mq_entry) == 128, "metadata entry is 128 bytes");
_Static_assert(sizeof(mq_pool) == 512, "pool record is 512 bytes");
_Static_assert(offsetof(mq_control, free_event) % 64 == 0, "free_event on its own line");

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define RELAXED_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define CAS(p, expected, desired) \
    __atomic_compare_exchange_n((p), (expected), (desired), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* ------------------------------------------------------ free list (Treiber) */

/* Pop a slot from a pool's free list; -1 when empty.  The tag in the head's upper
   half changes on every successful CAS, so a head that was popped and pushed back
   in between (ABA) makes the CAS fail instead of linking a stale `next`. */
static int64_t freelist_pop(mq_pool *pool, mq_entry *entries) {
    uint64_t head = LOAD(&pool->head);
    for (;;) {
        uint32_t top = (uint32_t)head;
        if (top == 0) return -1;
        uint32_t next = __atomic_load_n(&entries[top - 1].next_free, __ATOMIC_RELAXED);
        uint64_t desired = (((head >> 32) + 1) << 32) | next;
        if (CAS(&pool->head, &head, desired)) return (int64_t)top - 1;
    }
}

static void freelist_push(mq_pool *pool, mq_entry *entries, uint32_t slot) {
    uint64_t head = LOAD(&pool->head);
    for (;;) {
        __atomic_store_n(&entries[slot].next_free, (uint32_t)head, __ATOMIC_RELAXED);
        uint64_t desired = (((head >> 32) + 1) << 32) | (uint64_t)(slot + 1);
        if (CAS(&pool->head, &head, desired)) return;
    }
}

static long futex(uint32_t *word, int op, uint32_t value, const struct timespec *timeout) {
    /* no FUTEX_PRIVATE_FLAG: the word is shared between processes */
    return syscall(SYS_futex, word, op, value, timeout, NULL, 0);
}

/* --------------------------------------------------------------- Context */

/* A process's view of one domain: pointers into its mapped control segment. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;          /* keeps the mapping alive while the context exists */
    int has_view;
    int disabled;            /* set in a forked child: the parent's ledger is not ours */
    mq_control *ctl;
    mq_pool *pools;
    mq_entry *entries;
    uint64_t *ledger_base;
    uint64_t *ledger;        /* this process's row */
    mq_process *proc;
    uint32_t proc_slot;
    uint32_t lock_id;        /* what this process writes into a queue lock word */
    uint64_t epoch;          /* pools_epoch this process's pool view was built at */
    PyObject *block_views;   /* the manager's per-slot memoryview cache (a list), or NULL */
} Context;

static int mapped_check(Context *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "the shared-memory context is closed");
        return -1;
    }
    return 0;
}

/* The hot operations also refuse a disabled context: one that is shutting down (its
   ledger row is being reclaimed) or that was inherited through fork. */
static int context_check(Context *self) {
    if (mapped_check(self) < 0) return -1;
    if (self->disabled) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this shared-memory context is disabled: its manager was shut down, "
                        "or inherited through fork (create a new ShmManager in the child)");
        return -1;
    }
    return 0;
}

/* Do the control header's tables fit in `len` bytes?  A corrupt header must not
   send any process writing outside its mapping. */
static int control_fits(const mq_control *ctl, uint64_t len) {
    uint64_t procs = ctl->max_processes, pools = ctl->max_pools, bufs = ctl->max_buffers;
    if (procs == 0 || procs > 4096 || pools == 0 || pools > 1024 || bufs == 0 || bufs >= (1u << 31))
        return 0;
    /* in order, without overlaps (a table over the header made `% max_pools` divide by
       zero), aligned for the atomics, and inside the mapping */
    return ctl->procs_offset >= sizeof(mq_control) && ctl->procs_offset % 64 == 0 &&
           ctl->pools_offset >= ctl->procs_offset + procs * sizeof(mq_process) && ctl->pools_offset % 64 == 0 &&
           ctl->meta_offset >= ctl->pools_offset + pools * sizeof(mq_pool) && ctl->meta_offset % 64 == 0 &&
           ctl->ledger_offset >= ctl->meta_offset + bufs * sizeof(mq_entry) && ctl->ledger_offset % 8 == 0 &&
           ctl->ledger_offset + procs * bufs * 8 <= len && ctl->slots_used <= bufs;
}

static int Context_init(Context *self, PyObject *args, PyObject *kwds) {
    PyObject *buffer;
    unsigned int proc_slot;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Context is already initialized");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OI", &buffer, &proc_slot)) return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0) return -1;
    mq_control *ctl = (mq_control *)view.buf;
    if ((size_t)view.len < sizeof(mq_control) || !control_fits(ctl, (uint64_t)view.len) ||
        proc_slot >= ctl->max_processes) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "control segment too small or corrupt, or process slot out of range");
        return -1;
    }
    self->view = view;
    self->has_view = 1;
    char *base = (char *)ctl;
    self->ctl = ctl;
    self->pools = (mq_pool *)(base + ctl->pools_offset);
    self->entries = (mq_entry *)(base + ctl->meta_offset);
    self->ledger_base = (uint64_t *)(base + ctl->ledger_offset);
    self->ledger = self->ledger_base + (uint64_t)proc_slot * ctl->max_buffers;
    self->proc = (mq_process *)(base + ctl->procs_offset) + proc_slot;
    self->proc_slot = proc_slot;
    /* slot + 1 in the low 13 bits (max_processes <= 4096), the slot's incarnation above:
       a holder killed inside a queue lock is told apart from the next process of its slot */
    self->lock_id = ((self->proc->incarnation & 0x7FFFF) << 13) | (proc_slot + 1);
    self->epoch = LOAD(&ctl->pools_epoch);
    return 0;
}

static void Context_release_view(Context *self) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
}

static void Context_dealloc(Context *self) {
    Context_release_view(self);
    Py_CLEAR(self->block_views);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Wake whoever sleeps on `event`.  A sleeper arms `armed` (sets it non-zero) before
   its last look at the condition; the first waker after that clears it and pays the
   system call, later wakers see it clear and pay nothing, so a burst of pushes to
   sleeping readers costs one FUTEX_WAKE, not one per push. */
static void wake(uint32_t *event, uint32_t *armed) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with the sleeper's arm-then-check */
    if (__atomic_load_n(armed, __ATOMIC_RELAXED) && __atomic_exchange_n(armed, 0, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add(event, 1, __ATOMIC_SEQ_CST);
        futex(event, FUTEX_WAKE, INT32_MAX, NULL);
    }
}

/* Return a freed block to its pool and wake allocators waiting for one. */
static void free_block(Context *self, uint32_t slot) {
    mq_entry *e = &self->entries[slot];
    mq_pool *pool = &self->pools[e->pool_id % self->ctl->max_pools];
    freelist_push(pool, self->entries, slot);
    __atomic_fetch_sub(&pool->used, 1, __ATOMIC_SEQ_CST); /* after the push: remove_pool trusts it */
    wake(&self->ctl->free_event, &self->ctl->alloc_waiters); /* alloc_waiters: the armed flag */
}

/* Drop `count` references of generation `gen` from a slot; returns 1 if it freed the
   block, 0 if others still hold it, -1 if the id is no longer valid. */
static int drop_refs(Context *self, uint32_t slot, uint32_t gen, uint32_t count) {
    mq_entry *e = &self->entries[slot];
    uint64_t state = LOAD(&e->state);
    for (;;) {
        uint32_t refs = (uint32_t)state;
        if ((uint32_t)(state >> 32) != gen || refs < count) return -1;
        if (CAS(&e->state, &state, state - count)) break;
    }
    if ((uint32_t)state != count) return 0;
    free_block(self, slot);
    return 1;
}

#define MQ_ERROR INT64_MIN /* a C helper's "exception set" return */

/* Allocate a block of `pool_id` for `size` bytes: its id >= 0, or -1 pool empty, -2
   pool inactive, -3 pools changed since this context's epoch (refresh, then retry),
   MQ_ERROR with an exception set. */
static int64_t alloc_block(Context *self, PyObject *pool_arg, PyObject *size_arg) {
    if (context_check(self) < 0) return MQ_ERROR;
    unsigned long pool_id = PyLong_AsUnsignedLong(pool_arg);
    if (pool_id == (unsigned long)-1 && PyErr_Occurred()) return MQ_ERROR;
    unsigned long long size = PyLong_AsUnsignedLongLong(size_arg);
    if (size == (unsigned long long)-1 && PyErr_Occurred()) return MQ_ERROR;
    if (pool_id >= self->ctl->max_pools) {
        PyErr_SetString(PyExc_ValueError, "pool id out of range");
        return MQ_ERROR;
    }
    int64_t t0 = now_ns();
    if (LOAD(&self->ctl->pools_epoch) != self->epoch) return -3;
    mq_pool *pool = &self->pools[pool_id];
    if (LOAD(&pool->state) != MQ_POOL_ACTIVE) return -2;
    if (size == 0 || size > pool->block_size) {
        PyErr_Format(PyExc_ValueError, "size %llu does not fit pool %lu's blocks", size, pool_id);
        return MQ_ERROR;
    }
    int64_t popped = freelist_pop(pool, self->entries);
    if (popped < 0) return -1;
    uint32_t slot = (uint32_t)popped;
    uint64_t used = __atomic_add_fetch(&pool->used, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool->state, __ATOMIC_SEQ_CST) != MQ_POOL_ACTIVE) {
        /* remove_pool() marked it while we popped: it checks `used` after marking, so
           either it sees our increment or we see its mark; here we saw it, undo.
           Pool records are never reused, so the push lands in the right list. */
        freelist_push(pool, self->entries, slot);
        __atomic_fetch_sub(&pool->used, 1, __ATOMIC_SEQ_CST);
        return -2;
    }
    /* `used` may briefly exceed the blocks while a concurrent free has pushed its block
       but not yet counted it down; the high-water mark counts blocks, so clamp */
    if (used > pool->block_count) used = pool->block_count;
    uint64_t high = __atomic_load_n(&pool->high_water, __ATOMIC_RELAXED);
    while (used > high && !__atomic_compare_exchange_n(&pool->high_water, &high, used, 0,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    mq_entry *e = &self->entries[slot];
    uint32_t gen = (uint32_t)(__atomic_load_n(&e->state, __ATOMIC_RELAXED) >> 32) + 1;
    if (gen == 0) gen = 1; /* generation 0 is never valid, so small ints are never ids */
    STORE(&self->ledger[slot], ((uint64_t)gen << 32) | 1);  /* recorded before use */
    e->size = size;
    e->flags = 0;
    e->timestamp_ns = 0;
    e->range_start_ns = e->range_end_ns = 0;
    e->alloc_time_ns = t0;
    e->creator_proc = self->proc_slot;
    e->creator_pid = self->proc->pid;
    STORE(&e->state, ((uint64_t)gen << 32) | 1);            /* published */
    mq_stats *st = &self->proc->stats;
    int bucket = bit_length(size);
    RELAXED_ADD(&st->size_hist[bucket < MQ_SIZE_BUCKETS ? bucket : MQ_SIZE_BUCKETS - 1], 1);
    RELAXED_ADD(&st->alloc_count, 1);
    uint64_t latency = (uint64_t)(now_ns() - t0);
    RELAXED_ADD(&st->latency_sum_ns, latency);
    if (latency > st->latency_max_ns) __atomic_store_n(&st->latency_max_ns, latency, __ATOMIC_RELAXED);
    return (int64_t)(((uint64_t)gen << 32) | slot);
}

/* alloc(pool_id, size) -> id >= 0, or -1 pool empty, -2 pool inactive,
   -3 pools changed since this context's epoch (refresh, then retry). */
static PyObject *Context_alloc(Context *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "alloc(pool_id, size)");
        return NULL;
    }
    int64_t id = alloc_block(self, args[0], args[1]);
    return id == MQ_ERROR ? NULL : PyLong_FromLongLong(id);
}

/* Split an id and check its slot is in range; 0 ok, -1 with an exception set. */
static int parse_id(Context *self, PyObject *arg, uint32_t *slot, uint32_t *gen) {
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return -1;
    *slot = (uint32_t)id;
    *gen = (uint32_t)(id >> 32);
    return 0;
}

static int slot_in_range(Context *self, uint32_t slot) {
    return slot < LOAD(&self->ctl->slots_used);
}

/* acquire(id) -> 0 after taking one more reference for this process, -1 if the id is
   stale, forged or already freed. */
static PyObject *Context_acquire(Context *self, PyObject *arg) {
    uint32_t slot, gen;
    if (context_check(self) < 0 || parse_id(self, arg, &slot, &gen) < 0) return NULL;
    if (gen == 0 || !slot_in_range(self, slot)) return PyLong_FromLong(-1);
    mq_entry *e = &self->entries[slot];
    uint64_t state = LOAD(&e->state);
    for (;;) {
        if ((uint32_t)(state >> 32) != gen || (uint32_t)state == 0) return PyLong_FromLong(-1);
        if ((uint32_t)state == UINT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "buffer reference count would overflow");
            return NULL;
        }
        if (CAS(&e->state, &state, state + 1)) break;
    }
    uint64_t held = self->ledger[slot];
    uint64_t count = ((uint32_t)(held >> 32) == gen) ? (uint32_t)held + 1 : 1;
    STORE(&self->ledger[slot], ((uint64_t)gen << 32) | count);
    return PyLong_FromLong(0);
}

/* release(id) -> 1 if this freed the block, 0 if others still hold it, -1 if this
   process holds no reference of that id (stale, forged or released twice). */
static int release_ref(Context *self, uint64_t id) {
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (gen == 0 || !slot_in_range(self, slot)) return -1;
    uint64_t held = self->ledger[slot];
    if ((uint32_t)(held >> 32) != gen || (uint32_t)held == 0) return -1;
    STORE(&self->ledger[slot], held - 1);  /* ledger first: a crash here leaks, never frees twice */
    int freed = drop_refs(self, slot, gen, 1);
    if (freed == 1) RELAXED_ADD(&self->proc->stats.dealloc_count, 1);
    return freed;
}

static PyObject *Context_release(Context *self, PyObject *arg) {
    if (context_check(self) < 0) return NULL;
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(release_ref(self, id));
}

/* ref_count(id) -> current count, or -1 if the id is not valid now. */
static PyObject *Context_ref_count(Context *self, PyObject *arg) {
    uint32_t slot, gen;
    if (context_check(self) < 0 || parse_id(self, arg, &slot, &gen) < 0) return NULL;
    if (gen == 0 || !slot_in_range(self, slot)) return PyLong_FromLong(-1);
    uint64_t state = LOAD(&self->entries[slot].state);
    if ((uint32_t)(state >> 32) != gen || (uint32_t)state == 0) return PyLong_FromLong(-1);
    return PyLong_FromLong((long)(uint32_t)state);
}

/* push_free(pool_id, first_slot, count): link fresh slots into a pool's free list
   (the caller has filled in their entries and holds the domain lock). */
static PyObject *Context_push_free(Context *self, PyObject *args) {
    unsigned int pool_id, first, count;
    if (!PyArg_ParseTuple(args, "III", &pool_id, &first, &count)) return NULL;
    if (mapped_check(self) < 0) return NULL;
    if (pool_id >= self->ctl->max_pools || (uint64_t)first + count > self->ctl->max_buffers) {
        PyErr_SetString(PyExc_ValueError, "pool id or slot range out of bounds");
        return NULL;
    }
    /* push in reverse so the first slot is handed out first */
    for (uint32_t i = count; i > 0; i--) freelist_push(&self->pools[pool_id], self->entries, first + i - 1);
    Py_RETURN_NONE;
}

/* reclaim(proc_slot) -> (references_released, blocks_freed): release every
   reference a dead process's ledger row records, and clear the row.  The caller
   holds the domain lock and has established that the process is dead. */
static PyObject *Context_reclaim(Context *self, PyObject *arg) {
    if (mapped_check(self) < 0) return NULL;
    unsigned long dead = PyLong_AsUnsignedLong(arg);
    if (dead == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (dead >= self->ctl->max_processes) {
        PyErr_SetString(PyExc_ValueError, "process slot out of range");
        return NULL;
    }
    uint64_t *row = self->ledger_base + (uint64_t)dead * self->ctl->max_buffers;
    uint32_t limit = LOAD(&self->ctl->slots_used);
    uint64_t released = 0, freed = 0;
    for (uint32_t slot = 0; slot < limit; slot++) {
        uint64_t held = row[slot];
        if (held == 0) continue;
        STORE(&row[slot], 0);
        uint32_t gen = (uint32_t)(held >> 32), count = (uint32_t)held;
        if (count == 0 || gen == 0) continue; /* gen 0 is never a valid id: nothing to undo */
        int r = drop_refs(self, slot, gen, count);
        if (r >= 0) {
            released += count;
            freed += (uint64_t)r;
            continue;
        }
        /* Not valid at `gen`: if the slot still sits at gen-1 with no references,
           the dead process popped it but died before publishing it. */
        uint32_t previous = gen == 1 ? UINT32_MAX : gen - 1;
        uint64_t state = LOAD(&self->entries[slot].state);
        if (state == ((uint64_t)previous << 32) || (previous == UINT32_MAX && state == 0)) {
            free_block(self, slot);
            freed++;
        }
    }
    return Py_BuildValue("KK", (unsigned long long)released, (unsigned long long)freed);
}

static PyObject *Context_disable(Context *self, PyObject *Py_UNUSED(ignored)) {
    self->disabled = 1;
    Py_RETURN_NONE;
}

static PyObject *Context_close(Context *self, PyObject *Py_UNUSED(ignored)) {
    Context_release_view(self);
    Py_RETURN_NONE;
}

static PyObject *Context_refresh_epoch(Context *self, PyObject *Py_UNUSED(ignored)) {
    if (mapped_check(self) < 0) return NULL;
    self->epoch = LOAD(&self->ctl->pools_epoch);
    return PyLong_FromUnsignedLongLong(self->epoch);
}

static PyObject *new_buffer(PyObject *manager, Context *ctx, uint64_t id);

/* alloc_buffer(manager, pool_id, size) -> a Buffer holding the new block, or the
   int code of alloc() (-1, -2, -3): allocate() in one call. */
static PyObject *Context_alloc_buffer(Context *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "alloc_buffer(manager, pool_id, size)");
        return NULL;
    }
    int64_t id = alloc_block(self, args[1], args[2]);
    if (id == MQ_ERROR) return NULL;
    if (id < 0) return PyLong_FromLongLong(id);
    PyObject *buffer = new_buffer(args[0], self, (uint64_t)id);
    if (buffer == NULL) release_ref(self, (uint64_t)id);
    return buffer;
}

static PyMethodDef Context_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))Context_alloc, METH_FASTCALL,
     "alloc(pool_id, size) -> id, or -1 empty, -2 inactive pool, -3 pools changed"},
    {"alloc_buffer", (PyCFunction)(void (*)(void))Context_alloc_buffer, METH_FASTCALL,
     "alloc_buffer(manager, pool_id, size) -> Buffer, or alloc()'s code"},
    {"acquire", (PyCFunction)Context_acquire, METH_O, "acquire(id) -> 0, or -1 if invalid"},
    {"release", (PyCFunction)Context_release, METH_O,
     "release(id) -> 1 freed, 0 still held, -1 not held by this process"},
    {"ref_count", (PyCFunction)Context_ref_count, METH_O, "ref_count(id) -> count or -1"},
    {"push_free", (PyCFunction)Context_push_free, METH_VARARGS,
     "push_free(pool_id, first_slot, count)"},
    {"reclaim", (PyCFunction)Context_reclaim, METH_O,
     "reclaim(proc_slot) -> (references released, blocks freed)"},
    {"refresh_epoch", (PyCFunction)Context_refresh_epoch, METH_NOARGS,
     "adopt the current pools epoch; returns it"},
    {"disable", (PyCFunction)Context_disable, METH_NOARGS, "refuse every further operation"},
    {"close", (PyCFunction)Context_close, METH_NOARGS, "release the mapping"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Context_members[] = {
    {"block_views", T_OBJECT, offsetof(Context, block_views), 0,
     "list of per-slot memoryviews (None until made) that Buffer.memoryview() reads"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "multiqueue._native.Context",
    .tp_basicsize = sizeof(Context),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context(control_segment_buffer, proc_slot): hot buffer operations",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Context_init,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
    .tp_members = Context_members,
};

/* ---------------------------------------------------------------- buffers */

/* BufferBase: the hot half of multiqueue.Buffer (a Python subclass adds the rest).
 * One handle = one reference of this process on one block.  Creating, viewing and
 * releasing handles is the per-message cost of every stream, so those live here;
 * error messages stay in Python: on any failure the C code calls the subclass's
 * _raise_unusable() / _release_failed(), which raise the right exception. */
typedef struct {
    PyObject_HEAD
    PyObject *manager;       /* the ShmManager the reference was taken through */
    Context *ctx;            /* its context at that time (a shut-down one is disabled) */
    uint64_t id;
    Py_ssize_t size;
    int pool_id;             /* -1: not read yet */
    char live;
} BufferBase;

static PyTypeObject BufferBaseType;
static PyTypeObject *buffer_class = &BufferBaseType; /* set_buffer_class() replaces it */

static int buffer_usable(BufferBase *self) {
    return self->live && self->ctx != NULL && self->ctx->has_view && !self->ctx->disabled;
}

static PyObject *new_buffer(PyObject *manager, Context *ctx, uint64_t id) {
    BufferBase *b = (BufferBase *)buffer_class->tp_alloc(buffer_class, 0);
    if (b == NULL) return NULL;
    mq_entry *e = &ctx->entries[(uint32_t)id];
    Py_INCREF(manager);
    b->manager = manager;
    Py_INCREF(ctx);
    b->ctx = ctx;
    b->id = id;
    b->size = (Py_ssize_t)e->size;
    b->pool_id = e->pool_id;
    b->live = 1;
    return (PyObject *)b;
}

/* Buffer(manager, ctx, id, size, pool_id): a handle on a reference already taken. */
static int BufferBase_init(BufferBase *self, PyObject *args, PyObject *kwds) {
    PyObject *manager, *id_arg;
    Context *ctx;
    Py_ssize_t size;
    int pool_id;
    if (self->ctx != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Buffer is already initialized");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OO!Oni", &manager, &ContextType, &ctx, &id_arg, &size, &pool_id)) return -1;
    unsigned long long id = PyLong_AsUnsignedLongLong(id_arg);  /* OverflowError if < 0 */
    if (id == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "buffer size must be >= 0");
        return -1;
    }
    Py_INCREF(manager);
    self->manager = manager;
    Py_INCREF(ctx);
    self->ctx = ctx;
    self->id = id;
    self->size = size;
    self->pool_id = pool_id;
    self->live = 1;
    return 0;
}

static void BufferBase_dealloc(BufferBase *self) {
    /* a handle dropped without release() releases its reference (a closed or
       disabled context already gave it up at shutdown) */
    if (buffer_usable(self)) release_ref(self->ctx, self->id);
    Py_CLEAR(self->manager);
    Py_CLEAR(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *raise_unusable(BufferBase *self) {
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_raise_unusable", NULL);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    PyErr_SetString(PyExc_RuntimeError, "buffer is not usable");
    return NULL;
}

/* _check(): None if the handle may be used, else raises (released, shut down). */
static PyObject *BufferBase_check(BufferBase *self, PyObject *Py_UNUSED(ignored)) {
    if (!buffer_usable(self)) return raise_unusable(self);
    Py_RETURN_NONE;
}

/* memoryview(): the payload's `size` bytes in place, from the per-slot cache. */
static PyObject *BufferBase_memoryview(BufferBase *self, PyObject *Py_UNUSED(ignored)) {
    if (!buffer_usable(self)) return raise_unusable(self);
    uint32_t slot = (uint32_t)self->id;
    PyObject *views = self->ctx->block_views, *view = NULL;
    if (views != NULL && PyList_CheckExact(views) && slot < (uint64_t)PyList_GET_SIZE(views)) {
        view = PyList_GET_ITEM(views, slot);
        if (PyMemoryView_Check(view)) Py_INCREF(view);
        else view = NULL;
    }
    if (view == NULL) {  /* first use of the slot in this process: the manager maps it */
        view = PyObject_CallMethod(self->manager, "_block_view", "I", slot);
        if (view == NULL) return NULL;
        if (!PyMemoryView_Check(view)) {
            Py_DECREF(view);
            PyErr_SetString(PyExc_TypeError, "_block_view() must return a memoryview");
            return NULL;
        }
    }
    /* always a new view: a caller releasing it (`with b.memoryview() as v`) must not
       release the cached one that every later handle on the slot shares */
    PyObject *part = PyMemoryView_GET_BUFFER(view)->len == self->size
                         ? PyMemoryView_FromObject(view)
                         : PySequence_GetSlice(view, 0, self->size);
    Py_DECREF(view);
    return part;
}

/* release(): drop this handle's reference; the last one returns the block. */
static PyObject *BufferBase_release(BufferBase *self, PyObject *Py_UNUSED(ignored)) {
    int was_live = self->live, held = -1;
    self->live = 0;
    if (was_live && self->ctx != NULL && self->ctx->has_view && !self->ctx->disabled)
        held = release_ref(self->ctx, self->id);
    if (held >= 0) Py_RETURN_NONE;
    return PyObject_CallMethod((PyObject *)self, "_release_failed", "O", was_live ? Py_True : Py_False);
}

static PyMethodDef BufferBase_methods[] = {
    {"memoryview", (PyCFunction)BufferBase_memoryview, METH_NOARGS,
     "A writable memoryview of the payload's size bytes, in place."},
    {"release", (PyCFunction)BufferBase_release, METH_NOARGS,
     "Drop this handle's reference; the last one returns the block to its pool."},
    {"_check", (PyCFunction)BufferBase_check, METH_NOARGS, "raise unless the handle is usable"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef BufferBase_members[] = {
    {"_manager", T_OBJECT, offsetof(BufferBase, manager), READONLY, NULL},
    {"_ctx", T_OBJECT, offsetof(BufferBase, ctx), READONLY, NULL},
    {"_id", T_ULONGLONG, offsetof(BufferBase, id), READONLY, NULL},
    {"_size", T_PYSSIZET, offsetof(BufferBase, size), READONLY, NULL},
    {"_pool_id", T_INT, offsetof(BufferBase, pool_id), 0, NULL},
    {"_live", T_BOOL, offsetof(BufferBase, live), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BufferBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "multiqueue._native.BufferBase",
    .tp_basicsize = sizeof(BufferBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "BufferBase(manager, context, id, size, pool_id): hot half of multiqueue.Buffer",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BufferBase_init,
    .tp_dealloc = (destructor)BufferBase_dealloc,
    .tp_methods = BufferBase_methods,
    .tp_members = BufferBase_members,
};

/* set_buffer_class(cls): the BufferBase subclass that alloc_buffer / pop_buffer make. */
static PyObject *set_buffer_class(PyObject *m, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &BufferBaseType)) {
        PyErr_SetString(PyExc_TypeError, "set_buffer_class takes a subclass of BufferBase");
        return NULL;
    }
    Py_INCREF(cls);  /* kept for the life of the process */
    buffer_class = (PyTypeObject *)cls;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- port queues */

/* A port queue is a multicast ring of buffer ids in its own segment: one producer,
 * up to max_readers readers, each with its own cursor, each seeing every item.
 *
 * References: the queue holds one reference per unread item per reader.  push()
 * moves the producer's reference into the queue and adds one per extra reader;
 * pop() moves one from the queue into the reader's process ledger.  A reader's
 * cursor only moves by compare-and-swap "take": read the item at the cursor, then
 * CAS the cursor past it; whoever wins (the reader popping, the producer dropping
 * the oldest item of a drop_oldest reader, a detach) owns that item's reference.
 *
 * The queue lock (holder's process slot + 1) makes the reader set and the ring
 * stable for push, join and detach; a reader's own pop needs no lock. */

#define MQ_UNSET UINT64_MAX
enum { MQ_READER_FREE = 0, MQ_READER_ACTIVE = 1 };
enum { MQ_POLICY_BLOCK = 0, MQ_POLICY_DROP = 1 };
enum { MQ_CLOCK_MONOTONIC = 0, MQ_CLOCK_REALTIME = 1 };

typedef struct {
    mq_segment_header seg;
    uint32_t capacity;       /* a power of two */
    uint32_t mask;
    uint32_t max_readers;
    uint32_t readers_hw;     /* reader slots ever used: scans stop here */
    char name[32];
    uint32_t clock;          /* MQ_CLOCK_*: stamps items pushed without a timestamp */
    uint32_t reserved0;
    uint64_t reserved[1];
    /* producer line */
    uint64_t head;           /* sequence number of the next item */
    uint32_t lock;
    uint32_t closed;         /* 1 closed by its producer, 2 abandoned (producer died) */
    uint64_t producer;       /* pid << 32 | process slot + 1; 0 = none yet */
    uint64_t producer_start;
    uint64_t pushed;
    uint64_t blocked_ns;     /* time the producer spent waiting for space */
    uint64_t pad0[2];
    /* waiting line */
    uint32_t data_event;     /* bumped after a push when readers sleep */
    uint32_t data_waiters;
    uint32_t space_event;    /* bumped after a pop or detach when the producer sleeps */
    uint32_t space_waiters;
    uint64_t pad1[6];
} mq_queue;

typedef struct {
    uint64_t cursor;         /* sequence number of the next item to read */
    uint32_t state;
    uint32_t policy;
    uint32_t proc;           /* owner's process slot in the domain */
    uint32_t pid;
    uint64_t start_time;     /* owner's start time, for liveness */
    uint64_t popped;
    uint64_t drops;
    uint64_t joined_seq;
    uint64_t pad[1];
} mq_reader;

typedef struct {
    uint64_t id;
    int64_t timestamp_ns;
} mq_item;

_Static_assert(sizeof(mq_queue) == 256, "queue header is 256 bytes");
_Static_assert(sizeof(mq_reader) == 64, "reader is one cache line");
_Static_assert(offsetof(mq_queue, head) == 128 && offsetof(mq_queue, data_event) == 192, "lines");

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    Context *ctx;            /* the domain: metadata, ledger, free lists */
    mq_queue *q;
    mq_reader *readers;
    mq_item *ring;
    int waiting;             /* threads of this process inside wait() (counted with the GIL held) */
    pid_t owner;             /* the process that counts them: a forked child inherits the count, not the threads */
    int releasing;           /* release_view() is waiting for them to leave: wait() returns -1 */
} Queue;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int queue_check(Queue *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "the queue is closed in this process");
        return -1;
    }
    return context_check(self->ctx);
}

/* Take the queue lock, spinning a while; 0 if a holder keeps it (the caller then
   checks whether that holder is alive and may steal it). */
static int queue_lock(mq_queue *q, uint32_t me) {
    for (int i = 0; i < 1 << 16; i++) {
        uint32_t expected = 0;
        if (__atomic_compare_exchange_n(&q->lock, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return 1;
        cpu_relax();
        if ((i & 1023) == 1023) sched_yield();
    }
    return 0;
}

static void queue_unlock(mq_queue *q) { __atomic_store_n(&q->lock, 0, __ATOMIC_RELEASE); }

/* Move a reader's cursor past the item at `cur` if it is still there; 1 if this
   caller won the item (and so owns its queue reference), 0 if someone else did. */
static int take_item(Queue *self, mq_reader *r, uint64_t cur, uint64_t *id) {
    *id = __atomic_load_n(&self->ring[cur & self->q->mask].id, __ATOMIC_ACQUIRE);
    return __atomic_compare_exchange_n(&r->cursor, &cur, cur + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Could `id` name a block at all?  Rings are shared memory any process of the user can
   write: an id read from one is checked before it indexes the metadata or a ledger. */
static int plausible_id(Context *ctx, uint64_t id) {
    return (uint32_t)(id >> 32) != 0 && slot_in_range(ctx, (uint32_t)id);
}

/* Drop one queue-held reference (no ledger: the queue, not a process, held it). */
static void drop_queue_ref(Queue *self, uint64_t id) {
    if (!plausible_id(self->ctx, id)) return; /* garbage in the ring: it held nothing */
    if (drop_refs(self->ctx, (uint32_t)id, (uint32_t)(id >> 32), 1) == 1)
        RELAXED_ADD(&self->ctx->proc->stats.dealloc_count, 1);
}

/* Take one more reference on a live id for the queue (join with start="oldest"). */
static int add_queue_ref(Queue *self, uint64_t id) {
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (gen == 0 || !slot_in_range(self->ctx, slot)) return 0;
    mq_entry *e = &self->ctx->entries[slot];
    uint64_t state = LOAD(&e->state);
    for (;;) {
        if ((uint32_t)(state >> 32) != gen || (uint32_t)state == 0 || (uint32_t)state == UINT32_MAX) return 0;
        if (CAS(&e->state, &state, state + 1)) return 1;
    }
}

static int Queue_init(Queue *self, PyObject *args, PyObject *kwds) {
    Context *ctx;
    PyObject *buffer;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Queue is already initialized");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!O", &ContextType, &ctx, &buffer)) return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0) return -1;
    mq_queue *q = (mq_queue *)view.buf;
    if ((size_t)view.len < sizeof(mq_queue)) { /* before reading any field */
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "queue segment too small or corrupt");
        return -1;
    }
    uint64_t need = (uint64_t)sizeof(mq_queue) + (uint64_t)q->max_readers * sizeof(mq_reader) +
                    (uint64_t)q->capacity * sizeof(mq_item);
    if (q->capacity == 0 || (q->capacity & (q->capacity - 1)) ||
        q->mask != q->capacity - 1 || q->max_readers == 0 || q->max_readers > 1024 ||
        q->readers_hw > q->max_readers || need > (uint64_t)view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "queue segment too small or corrupt");
        return -1;
    }
    self->view = view;
    self->has_view = 1;
    Py_INCREF(ctx);
    self->ctx = ctx;
    self->q = q;
    self->readers = (mq_reader *)((char *)q + sizeof(mq_queue));
    self->ring = (mq_item *)((char *)self->readers + (size_t)q->max_readers * sizeof(mq_reader));
    self->owner = getpid();
    return 0;
}

static void Queue_dealloc(Queue *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_XDECREF(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* push(id) -> 1 pushed, 0 full (a blocking reader has no room), -1 closed, -2 lock
   busy, -3 this process holds no reference of `id`.  On 1 the caller's reference
   has moved into the queue.  (push_id: the same, for C callers.) */
static int push_id(Queue *self, uint64_t id) {
    mq_queue *q = self->q;
    Context *ctx = self->ctx;
    if (LOAD(&q->closed)) return -1;
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (gen == 0 || !slot_in_range(ctx, slot)) return -3;
    uint64_t held = ctx->ledger[slot];
    if ((uint32_t)(held >> 32) != gen || (uint32_t)held == 0) return -3;
    if (!queue_lock(q, ctx->lock_id)) return -2;
    uint64_t head = q->head;
    uint32_t hw = LOAD(&q->readers_hw), readers = 0;
    for (uint32_t i = 0; i < hw; i++) { /* a full blocking reader refuses, before any drop */
        mq_reader *r = &self->readers[i];
        if (LOAD(&r->state) == MQ_READER_ACTIVE && r->policy == MQ_POLICY_BLOCK &&
            head - LOAD(&r->cursor) >= q->capacity) {
            queue_unlock(q);
            return 0;
        }
    }
    for (uint32_t i = 0; i < hw; i++) { /* room in every drop_oldest reader: drop its oldest */
        mq_reader *r = &self->readers[i];
        if (LOAD(&r->state) != MQ_READER_ACTIVE) continue;
        uint64_t cur = LOAD(&r->cursor);
        if (head - cur >= q->capacity && r->policy != MQ_POLICY_BLOCK) {
            uint64_t dropped;
            if (take_item(self, r, cur, &dropped)) { /* else the reader just popped it */
                drop_queue_ref(self, dropped);
                RELAXED_ADD(&r->drops, 1);
            }
        }
        readers++;
    }
    mq_entry *e = &ctx->entries[slot];
    int64_t ts = e->timestamp_ns;
    if (ts == 0) { /* stamped at push when the producer did not */
        struct timespec now;
        clock_gettime(q->clock == MQ_CLOCK_REALTIME ? CLOCK_REALTIME : CLOCK_MONOTONIC, &now);
        ts = e->timestamp_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    }
    STORE(&ctx->ledger[slot], held - 1); /* our reference now belongs to the queue */
    if (readers == 0) { /* nobody listens: released at once */
        if (drop_refs(ctx, slot, gen, 1) == 1) RELAXED_ADD(&ctx->proc->stats.dealloc_count, 1);
    } else if (readers > 1) {
        __atomic_fetch_add(&e->state, readers - 1, __ATOMIC_ACQ_REL); /* we hold one: still valid */
    }
    if (readers) {
        mq_item *item = &self->ring[head & q->mask];
        item->timestamp_ns = ts;
        __atomic_store_n(&item->id, id, __ATOMIC_RELAXED);
        STORE(&q->head, head + 1);
    }
    queue_unlock(q);
    RELAXED_ADD(&q->pushed, 1);
    if (readers) wake(&q->data_event, &q->data_waiters);
    return 1;
}

static PyObject *Queue_push(Queue *self, PyObject *arg) {
    if (queue_check(self) < 0) return NULL;
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(push_id(self, id));
}

/* push_buffer(buffer) -> push()'s codes, or -5 not a Buffer, -6 the handle is
   released or unusable, -7 the handle belongs to another context.  On 1 the
   handle's reference has moved into the queue and the handle is released. */
static PyObject *Queue_push_buffer(Queue *self, PyObject *arg) {
    if (queue_check(self) < 0) return NULL;
    if (!PyObject_TypeCheck(arg, &BufferBaseType)) return PyLong_FromLong(-5);
    BufferBase *b = (BufferBase *)arg;
    if (!buffer_usable(b)) return PyLong_FromLong(-6);
    if (b->ctx != self->ctx) return PyLong_FromLong(-7);
    int result = push_id(self, b->id);
    if (result == 1) b->live = 0;
    return PyLong_FromLong(result);
}

static mq_reader *reader_arg(Queue *self, PyObject *arg, unsigned long *index) {
    *index = PyLong_AsUnsignedLong(arg);
    if (*index == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (*index >= self->q->max_readers) {
        PyErr_SetString(PyExc_ValueError, "reader index out of range");
        return NULL;
    }
    return &self->readers[*index];
}

/* Pop the reader's next item: its id, or -1 nothing to read, -2 closed and drained,
   -4 the reader was detached, MQ_ERROR with an exception set.  The popped reference
   moves into this process's ledger. */
static int64_t pop_item(Queue *self, PyObject *arg) {
    unsigned long index;
    if (queue_check(self) < 0) return MQ_ERROR;
    mq_reader *r = reader_arg(self, arg, &index);
    if (r == NULL) return MQ_ERROR;
    mq_queue *q = self->q;
    uint64_t cur, id;
    for (;;) {
        if (LOAD(&r->state) != MQ_READER_ACTIVE) return -4;
        cur = LOAD(&r->cursor);
        if (cur >= LOAD(&q->head)) {
            if (!LOAD(&q->closed)) return -1;
            if (cur >= LOAD(&q->head)) return -2; /* re-read: pushed before close */
            continue;
        }
        if (!take_item(self, r, cur, &id)) continue; /* lost it to a drop: try the next one */
        if (plausible_id(self->ctx, id)) break;
        RELAXED_ADD(&r->drops, 1); /* garbage written into the ring: skipped, counted as a drop */
    }
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    uint64_t *ledger = &self->ctx->ledger[slot];
    uint64_t count = ((uint32_t)(*ledger >> 32) == gen) ? (uint32_t)*ledger + 1 : 1;
    STORE(ledger, ((uint64_t)gen << 32) | count);
    RELAXED_ADD(&r->popped, 1);
    if (r->policy == MQ_POLICY_BLOCK) wake(&q->space_event, &q->space_waiters);
    return (int64_t)id;
}

/* pop(reader) -> id, or -1 nothing to read, -2 closed and drained, -4 detached. */
static PyObject *Queue_pop(Queue *self, PyObject *arg) {
    int64_t id = pop_item(self, arg);
    if (id == MQ_ERROR) return NULL;
    return id >= 0 ? PyLong_FromUnsignedLongLong((uint64_t)id) : PyLong_FromLongLong(id);
}

/* pop_buffer(reader, manager) -> a Buffer holding the popped reference, or pop()'s
   negative code. */
static PyObject *Queue_pop_buffer(Queue *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop_buffer(reader, manager)");
        return NULL;
    }
    int64_t id = pop_item(self, args[0]);
    if (id == MQ_ERROR) return NULL;
    if (id < 0) return PyLong_FromLongLong(id);
    PyObject *buffer = new_buffer(args[1], self->ctx, (uint64_t)id);
    if (buffer == NULL) release_ref(self->ctx, (uint64_t)id);
    return buffer;
}

/* peek(reader) -> id of the next item without taking it, or -1. */
static PyObject *Queue_peek(Queue *self, PyObject *arg) {
    unsigned long index;
    if (queue_check(self) < 0) return NULL;
    mq_reader *r = reader_arg(self, arg, &index);
    if (r == NULL) return NULL;
    uint64_t cur = LOAD(&r->cursor);
    if (LOAD(&r->state) != MQ_READER_ACTIVE || cur >= LOAD(&self->q->head)) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLongLong(LOAD(&self->ring[cur & self->q->mask].id));
}

/* join(policy, oldest, pid, start_time) -> reader index, -1 no free reader slot,
   -2 lock busy.  With `oldest` the reader starts at the oldest item still alive. */
static PyObject *Queue_join(Queue *self, PyObject *args) {
    unsigned int policy, pid;
    int oldest;
    unsigned long long start_time;
    if (!PyArg_ParseTuple(args, "IpIK", &policy, &oldest, &pid, &start_time)) return NULL;
    if (queue_check(self) < 0) return NULL;
    mq_queue *q = self->q;
    if (!queue_lock(q, self->ctx->lock_id)) return PyLong_FromLong(-2);
    uint32_t index = 0;
    while (index < q->max_readers && LOAD(&self->readers[index].state) != MQ_READER_FREE) index++;
    if (index == q->max_readers) {
        queue_unlock(q);
        return PyLong_FromLong(-1);
    }
    mq_reader *r = &self->readers[index];
    uint64_t head = q->head, cursor = head;
    if (oldest) { /* walk back while items are alive, taking a reference on each */
        uint64_t low = head > q->capacity ? head - q->capacity : 0;
        while (cursor > low && add_queue_ref(self, self->ring[(cursor - 1) & q->mask].id)) cursor--;
    }
    r->policy = policy ? MQ_POLICY_DROP : MQ_POLICY_BLOCK;
    r->proc = self->ctx->proc_slot;
    r->pid = pid;
    r->start_time = start_time;
    r->popped = r->drops = 0;
    r->joined_seq = cursor;
    STORE(&r->cursor, cursor);
    /* the high-water mark first: killed between the two stores, the slot is still
       FREE and in range of every scan; the other order hid an ACTIVE reader from
       pushes and reaps (found by tests/protocol_model.py) */
    if (index + 1 > q->readers_hw) STORE(&q->readers_hw, index + 1);
    STORE(&r->state, MQ_READER_ACTIVE);
    queue_unlock(q);
    wake(&q->space_event, &q->space_waiters); /* a producer may wait for readers to join */
    return PyLong_FromLong((long)index);
}

/* detach(reader) -> references released, or -2 lock busy.  Releases the reader's
   unread items and frees its slot; used by the owner and to reap dead owners. */
static PyObject *Queue_detach(Queue *self, PyObject *arg) {
    unsigned long index;
    if (!self->has_view) return PyErr_Format(PyExc_RuntimeError, "the queue is closed in this process");
    if (mapped_check(self->ctx) < 0) return NULL;
    mq_reader *r = reader_arg(self, arg, &index);
    if (r == NULL) return NULL;
    mq_queue *q = self->q;
    if (!queue_lock(q, self->ctx->lock_id)) return PyLong_FromLong(-2);
    long released = 0;
    if (LOAD(&r->state) == MQ_READER_ACTIVE) {
        for (;;) {
            uint64_t cur = LOAD(&r->cursor), id;
            if (cur >= q->head) break;
            if (take_item(self, r, cur, &id)) {
                drop_queue_ref(self, id);
                released++;
            }
        }
        STORE(&r->state, MQ_READER_FREE);
    }
    queue_unlock(q);
    wake(&q->space_event, &q->space_waiters);
    return PyLong_FromLong(released);
}

/* Is what `kind` waits for there?  0: an item for reader `index`; 1: room for the
   producer in every blocking reader; 2: at least `index` readers attached.  -1 when
   closed (and, for readers, drained). */
static int queue_ready(Queue *self, int kind, unsigned long index) {
    mq_queue *q = self->q;
    if (kind == 2) {
        uint32_t hw = LOAD(&q->readers_hw), active = 0;
        for (uint32_t i = 0; i < hw; i++) active += LOAD(&self->readers[i].state) == MQ_READER_ACTIVE;
        return LOAD(&q->closed) ? -1 : active >= index;
    }
    if (kind == 0) {
        mq_reader *r = &self->readers[index];
        if (LOAD(&r->state) != MQ_READER_ACTIVE) return -1;
        if (LOAD(&r->cursor) < LOAD(&q->head)) return 1;
        return LOAD(&q->closed) ? (LOAD(&r->cursor) < LOAD(&q->head) ? 1 : -1) : 0;
    }
    if (LOAD(&q->closed)) return -1;
    uint64_t head = LOAD(&q->head);
    uint32_t hw = LOAD(&q->readers_hw);
    for (uint32_t i = 0; i < hw; i++) {
        mq_reader *r = &self->readers[i];
        if (LOAD(&r->state) == MQ_READER_ACTIVE && r->policy == MQ_POLICY_BLOCK &&
            head - LOAD(&r->cursor) >= q->capacity)
            return 0;
    }
    return 1;
}

/* wait(kind, reader, timeout_s, spin_s) -> 1 ready, 0 timed out, -1 closed.
   Spins up to spin_s (a negative spin_s spins for the whole timeout: busy-poll),
   then sleeps on the futex; the GIL is released throughout. */
static PyObject *Queue_wait(Queue *self, PyObject *args) {
    int kind;
    unsigned long index;
    double timeout, spin;
    if (!PyArg_ParseTuple(args, "ikdd", &kind, &index, &timeout, &spin)) return NULL;
    if (queue_check(self) < 0) return NULL;
    if (isnan(timeout) || isnan(spin) || kind < 0 || kind > 2 || (kind == 0 && index >= self->q->max_readers)) {
        PyErr_SetString(PyExc_ValueError, "wait(kind 0|1|2, reader or count, timeout, spin)");
        return NULL;
    }
    mq_queue *q = self->q;
    uint32_t *event = kind ? &q->space_event : &q->data_event; /* joins wake the space waiters */
    uint32_t *waiters = kind ? &q->space_waiters : &q->data_waiters;
    int ready;
    int64_t start = now_ns();
    int64_t deadline = timeout < 0 || timeout > 1e9 ? INT64_MAX : start + (int64_t)(timeout * 1e9);
    int64_t spin_until = spin < 0 ? deadline : start + (int64_t)(spin * 1e9);
    self->waiting++; /* release_view() waits for us to leave before it unmaps */
    Py_BEGIN_ALLOW_THREADS
    for (;;) { /* spin: a wake-up through the kernel costs tens of microseconds */
        ready = __atomic_load_n(&self->releasing, __ATOMIC_ACQUIRE) ? -1 : queue_ready(self, kind, index);
        if (ready) break;
        int64_t t = now_ns();
        if (t >= spin_until || t >= deadline) break;
        /* yield rather than pause: with more processes than cores (a producer and three
           readers on two), a spinning reader must not take the producer's core */
        sched_yield();
    }
    if (!ready) {
        for (;;) {
            /* Read the event, then arm, then look: a waker that clears the arm after we
               set it bumps the event after we read it, so the futex will not sleep; one
               that cleared it before finds us armed again.  (Arming first could let a
               wake-up slip between, and leave us asleep with nobody armed.) */
            uint32_t seen = __atomic_load_n(event, __ATOMIC_SEQ_CST);
            __atomic_store_n(waiters, 1, __ATOMIC_SEQ_CST);
            ready = __atomic_load_n(&self->releasing, __ATOMIC_ACQUIRE) ? -1 : queue_ready(self, kind, index);
            if (ready) break;
            int64_t left = deadline - now_ns();
            if (left <= 0) break;
            struct timespec ts = {left / 1000000000, left % 1000000000};
            futex(event, FUTEX_WAIT, seen, deadline == INT64_MAX ? NULL : &ts);
        }
    }
    Py_END_ALLOW_THREADS
    if (kind == 1) RELAXED_ADD(&q->blocked_ns, (uint64_t)(now_ns() - start));
    self->waiting--; /* after the last touch of the mapping */
    return PyLong_FromLong(ready);
}

/* close(state) -> previous state: 1 closed by the producer, 2 abandoned.  Wakes
   every waiter. */
static PyObject *Queue_close(Queue *self, PyObject *arg) {
    unsigned long state = PyLong_AsUnsignedLong(arg);
    if (state == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (!self->has_view) return PyErr_Format(PyExc_RuntimeError, "the queue is closed in this process");
    mq_queue *q = self->q;
    uint32_t expected = 0;
    __atomic_compare_exchange_n(&q->closed, &expected, (uint32_t)state, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&q->data_event, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&q->space_event, 1, __ATOMIC_SEQ_CST);
    futex(&q->data_event, FUTEX_WAKE, INT32_MAX, NULL);
    futex(&q->space_event, FUTEX_WAKE, INT32_MAX, NULL);
    return PyLong_FromUnsignedLong(expected);
}

/* steal_lock(holder) -> True if the lock was held by `holder` (a dead process's
   slot + 1, as the caller established) and is now free. */
static PyObject *Queue_steal_lock(Queue *self, PyObject *arg) {
    unsigned long holder = PyLong_AsUnsignedLong(arg);
    if (holder == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (!self->has_view) return PyErr_Format(PyExc_RuntimeError, "the queue is closed in this process");
    uint32_t expected = (uint32_t)holder;
    int ok = __atomic_compare_exchange_n(&self->q->lock, &expected, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return PyBool_FromLong(ok);
}

/* release_view(): unmap, after every thread of this process waiting in wait() on this
   queue has left it (they return -1): unmapping under a sleeping waiter would crash it. */
static PyObject *Queue_release_view(Queue *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view) {
        __atomic_store_n(&self->releasing, 1, __ATOMIC_RELEASE);
        while (self->waiting > 0 && getpid() == self->owner) {
            mq_queue *q = self->q;
            __atomic_fetch_add(&q->data_event, 1, __ATOMIC_SEQ_CST); /* other processes' waiters */
            __atomic_fetch_add(&q->space_event, 1, __ATOMIC_SEQ_CST); /* see a spurious wake-up */
            futex(&q->data_event, FUTEX_WAKE, INT32_MAX, NULL);
            futex(&q->space_event, FUTEX_WAKE, INT32_MAX, NULL);
            Py_BEGIN_ALLOW_THREADS /* let them take the GIL and leave */
            sched_yield();
            Py_END_ALLOW_THREADS
        }
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Queue_methods[] = {
    {"push", (PyCFunction)Queue_push, METH_O,
     "push(id) -> 1 pushed, 0 full, -1 closed, -2 lock busy, -3 id not held"},
    {"push_buffer", (PyCFunction)Queue_push_buffer, METH_O,
     "push_buffer(buffer) -> push()'s codes, -5 not a Buffer, -6 unusable, -7 other context"},
    {"pop", (PyCFunction)Queue_pop, METH_O, "pop(reader) -> id, or -1 empty, -2 closed, -4 detached"},
    {"pop_buffer", (PyCFunction)(void (*)(void))Queue_pop_buffer, METH_FASTCALL,
     "pop_buffer(reader, manager) -> Buffer, or pop()'s negative code"},
    {"peek", (PyCFunction)Queue_peek, METH_O, "peek(reader) -> id of the next item or -1"},
    {"join", (PyCFunction)Queue_join, METH_VARARGS,
     "join(policy, oldest, pid, start_time) -> reader index, -1 full, -2 lock busy"},
    {"detach", (PyCFunction)Queue_detach, METH_O, "detach(reader) -> references released, -2 busy"},
    {"wait", (PyCFunction)Queue_wait, METH_VARARGS,
     "wait(kind, reader_or_count, timeout_s, spin_s) -> 1 ready, 0 timeout, -1 closed; kind 0 data, "
     "1 space, 2 readers"},
    {"close", (PyCFunction)Queue_close, METH_O, "close(state) -> previous state; wakes everyone"},
    {"steal_lock", (PyCFunction)Queue_steal_lock, METH_O, "steal_lock(dead_holder) -> freed"},
    {"release_view", (PyCFunction)Queue_release_view, METH_NOARGS, "drop the mapping"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "multiqueue._native.Queue",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Queue(context, queue_segment_buffer): multicast ring of buffer ids",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
};

/* ------------------------------------------- primitives on any writable buffer */

/* Resolve (buffer, offset) to an aligned word address; -1 with an exception set. */
static int word_at(PyObject *buffer, Py_ssize_t offset, Py_ssize_t width, Py_buffer *view, void **addr) {
    if (PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE) < 0) return -1;
    if (offset < 0 || offset > view->len - width || ((uintptr_t)view->buf + offset) % width) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "offset %zd is out of range or not %zd-byte aligned", offset, width);
        return -1;
    }
    *addr = (char *)view->buf + offset;
    return 0;
}

static PyObject *atomic_load_u64(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "On", &buf, &off) || word_at(buf, off, 8, &v, &a) < 0) return NULL;
    uint64_t r = __atomic_load_n((uint64_t *)a, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(r);
}

static PyObject *atomic_store_u64(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned long long val; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "OnK", &buf, &off, &val) || word_at(buf, off, 8, &v, &a) < 0) return NULL;
    __atomic_store_n((uint64_t *)a, (uint64_t)val, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *atomic_add_u64(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; long long delta; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "OnL", &buf, &off, &delta) || word_at(buf, off, 8, &v, &a) < 0) return NULL;
    uint64_t r = __atomic_add_fetch((uint64_t *)a, (uint64_t)delta, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(r);
}

static PyObject *atomic_cas_u64(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned long long expected, desired; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "OnKK", &buf, &off, &expected, &desired) || word_at(buf, off, 8, &v, &a) < 0)
        return NULL;
    uint64_t exp = expected;
    int ok = __atomic_compare_exchange_n((uint64_t *)a, &exp, (uint64_t)desired, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return Py_BuildValue("OK", ok ? Py_True : Py_False, (unsigned long long)exp);
}

static PyObject *atomic_load_u32(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "On", &buf, &off) || word_at(buf, off, 4, &v, &a) < 0) return NULL;
    uint32_t r = __atomic_load_n((uint32_t *)a, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *atomic_add_u32(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; int delta; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "Oni", &buf, &off, &delta) || word_at(buf, off, 4, &v, &a) < 0) return NULL;
    uint32_t r = __atomic_add_fetch((uint32_t *)a, (uint32_t)delta, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(r);
}

/* futex_wait(buffer, offset, expected, timeout_s) -> True if woken (or the word had
   already changed), False on timeout.  Sleeps in the kernel with the GIL released;
   a negative timeout waits forever. */
static PyObject *futex_wait(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned int expected; double timeout; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "OnId", &buf, &off, &expected, &timeout) || word_at(buf, off, 4, &v, &a) < 0)
        return NULL;
    if (isnan(timeout)) {
        PyErr_SetString(PyExc_ValueError, "timeout is NaN");
        return NULL;
    }
    struct timespec ts, *tsp = NULL;
    if (timeout >= 0 && timeout < 1e9) { /* beyond ~31 years, or infinite: no timeout */
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    long r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = futex((uint32_t *)a, FUTEX_WAIT, expected, tsp);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (r == 0 || err == EAGAIN || err == EINTR) Py_RETURN_TRUE;
    if (err == ETIMEDOUT) Py_RETURN_FALSE;
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* futex_wake(buffer, offset, count) -> number of waiters woken */
static PyObject *futex_wake(PyObject *m, PyObject *args) {
    PyObject *buf; Py_ssize_t off; int count; Py_buffer v; void *a;
    if (!PyArg_ParseTuple(args, "Oni", &buf, &off, &count) || word_at(buf, off, 4, &v, &a) < 0) return NULL;
    long r = futex((uint32_t *)a, FUTEX_WAKE, (uint32_t)count, NULL);
    PyBuffer_Release(&v);
    if (r < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

/* layout() -> {"struct.field": offset, "struct": size, ...} for the ctypes mirror in
   multiqueue/shm/layout.py; a test checks that both agree field by field. */
static int put(PyObject *d, const char *key, size_t value) {
    PyObject *v = PyLong_FromSize_t(value);
    int r = v ? PyDict_SetItemString(d, key, v) : -1;
    Py_XDECREF(v);
    return r;
}
#define SIZE(T) put(d, #T, sizeof(T))
#define FIELD(T, f) put(d, #T "." #f, offsetof(T, f))

static PyObject *layout(PyObject *m, PyObject *Py_UNUSED(ignored)) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    int bad = SIZE(mq_segment_header) | FIELD(mq_segment_header, version) |
              FIELD(mq_segment_header, creator_start) | FIELD(mq_segment_header, total_size) |
              SIZE(mq_stats) | FIELD(mq_stats, latency_max_ns) | FIELD(mq_stats, size_hist) |
              SIZE(mq_control) | FIELD(mq_control, slots_used) | FIELD(mq_control, pools_epoch) |
              FIELD(mq_control, ledger_offset) | FIELD(mq_control, name_prefix) |
              FIELD(mq_control, free_event) | FIELD(mq_control, alloc_waiters) |
              FIELD(mq_control, retired) | SIZE(mq_process) | FIELD(mq_process, start_time) |
              FIELD(mq_process, name) | FIELD(mq_process, stats) |
              FIELD(mq_process, incarnation) | SIZE(mq_chunk) | SIZE(mq_pool) |
              FIELD(mq_pool, used) | FIELD(mq_pool, high_water) | FIELD(mq_pool, state) |
              FIELD(mq_pool, block_size) | FIELD(mq_pool, name) | FIELD(mq_pool, chunks) |
              SIZE(mq_entry) | FIELD(mq_entry, next_free) | FIELD(mq_entry, pool_id) |
              FIELD(mq_entry, chunk) | FIELD(mq_entry, size) | FIELD(mq_entry, data_offset) |
              FIELD(mq_entry, timestamp_ns) | FIELD(mq_entry, range_end_ns) |
              FIELD(mq_entry, alloc_time_ns) | FIELD(mq_entry, creator_pid) |
              SIZE(mq_queue) | FIELD(mq_queue, capacity) | FIELD(mq_queue, readers_hw) |
              FIELD(mq_queue, clock) | FIELD(mq_queue, head) | FIELD(mq_queue, lock) |
              FIELD(mq_queue, closed) | FIELD(mq_queue, producer) | FIELD(mq_queue, pushed) |
              FIELD(mq_queue, blocked_ns) | FIELD(mq_queue, data_event) |
              FIELD(mq_queue, space_waiters) | SIZE(mq_reader) | FIELD(mq_reader, state) |
              FIELD(mq_reader, proc) | FIELD(mq_reader, start_time) | FIELD(mq_reader, drops) |
              FIELD(mq_reader, joined_seq) | SIZE(mq_item) | FIELD(mq_item, timestamp_ns) |
              put(d, "MQ_SIZE_BUCKETS", MQ_SIZE_BUCKETS) | put(d, "MQ_MAX_CHUNKS", MQ_MAX_CHUNKS);
    if (bad) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyMethodDef module_methods[] = {
    {"atomic_load_u64", atomic_load_u64, METH_VARARGS, "atomic_load_u64(buffer, offset) -> int"},
    {"atomic_store_u64", atomic_store_u64, METH_VARARGS, "atomic_store_u64(buffer, offset, value)"},
    {"atomic_add_u64", atomic_add_u64, METH_VARARGS, "atomic_add_u64(buffer, offset, delta) -> new value"},
    {"atomic_cas_u64", atomic_cas_u64, METH_VARARGS,
     "atomic_cas_u64(buffer, offset, expected, desired) -> (swapped, value seen)"},
    {"atomic_load_u32", atomic_load_u32, METH_VARARGS, "atomic_load_u32(buffer, offset) -> int"},
    {"atomic_add_u32", atomic_add_u32, METH_VARARGS, "atomic_add_u32(buffer, offset, delta) -> new value"},
    {"futex_wait", futex_wait, METH_VARARGS,
     "futex_wait(buffer, offset, expected, timeout_s) -> False on timeout"},
    {"futex_wake", futex_wake, METH_VARARGS, "futex_wake(buffer, offset, count) -> woken"},
    {"layout", layout, METH_NOARGS, "sizes and offsets of the shared structures"},
    {"set_buffer_class", set_buffer_class, METH_O, "set_buffer_class(cls): the Buffer type to make"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "multiqueue._native",
    "Atomics, futexes and the hot buffer operations on shared memory.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&QueueType) < 0 ||
        PyType_Ready(&BufferBaseType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) return NULL;
    Py_INCREF(&ContextType);
    Py_INCREF(&QueueType);
    Py_INCREF(&BufferBaseType);
    if (PyModule_AddObject(m, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObject(m, "BufferBase", (PyObject *)&BufferBaseType) < 0 ||
        PyModule_AddObject(m, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
