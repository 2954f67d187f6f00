"""SyncReader over real port queues: aligned tuples of shared-memory buffers, no leaks."""

import numpy as np

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.stream import PortQueue, SyncReader


def test_sync_reader_aligns_two_real_queues_and_leaks_nothing(domain):
    config = ShmConfig(pools=[PoolConfig("p", 64, 512)], max_buffers=1024)
    with ShmManager(domain, config, reaper_interval=None) as m:
        fast, slow = PortQueue(m, "fast", 256), PortQueue(m, "slow", 256)
        readers = {"fast": fast.reader(), "slow": slow.reader()}
        rng = np.random.default_rng(3)
        ms = 1_000_000
        fast_ts = [i * 10 * ms + int(rng.integers(-2 * ms, 2 * ms)) for i in range(100)]
        slow_ts = [i * 20 * ms + int(rng.integers(-2 * ms, 2 * ms)) for i in range(50)]
        for queue, stamps in ((fast, fast_ts), (slow, slow_ts)):
            for ts in stamps:
                b = m.allocate(8)
                b.numpy(np.int64)[0] = ts
                b.timestamp = ts
                queue.push(b)
            queue.close()
        with SyncReader(readers, policy="nearest", tolerance_ns=5 * ms, reference="slow") as sync:
            pairs = []
            for tup in sync:
                with tup:
                    fast_b, slow_b = tup
                    assert fast_b.numpy(np.int64)[0] == fast_b.timestamp  # payloads in place
                    pairs.append((fast_b.timestamp, slow_b.timestamp))
        # every slow item finds the fast item nearest to it (fast runs at twice the rate)
        assert len(pairs) == 50
        for f, s in pairs:
            assert abs(f - s) == min(abs(t - s) for t in fast_ts)
        stats = sync.stats
        assert stats.tuples == 50
        assert stats["slow"].matched == 50 and stats["fast"].taken == 100
        assert m.get_stats().total_allocated == 0
