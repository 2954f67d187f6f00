import multiprocessing as mp

import numpy as np

from multiqueue import ShmManager


def reader(buffer_id):  # any unrelated process: attach by domain name, read in place
    with ShmManager("readme") as manager, manager.get(buffer_id) as frame:
        print("reader sees", frame.numpy(np.float32)[:3], "refs:", frame.ref_count)


if __name__ == "__main__":
    with ShmManager("readme") as manager:
        frame = manager.allocate(4 * 160_000)  # a block of the smallest pool that fits
        samples = frame.numpy(np.float32)  # a view of shared memory: no copy
        samples[:] = np.arange(samples.size)
        frame.timestamp = 1_700_000_000_000_000_000  # int nanoseconds
        p = mp.get_context("spawn").Process(target=reader, args=(frame.id,))
        p.start()
        p.join()  # only the 8-byte id crossed to the other process
        frame.release()  # the last release returns the block to its pool
        manager.print_stats()
