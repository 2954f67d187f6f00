"""Three stages in three processes, each a plain function over named queues.

ramp (source, own process) -> halve (processing, own process) -> check (sink, here).
Frames travel as ids of shared-memory buffers; their dtype, shape and timestamps
travel with them.
"""

import numpy as np

from multiqueue import ShmManager
from multiqueue.stream import consumer, producer

DOMAIN = "stage-example"
FRAMES = 200
seen = {"frames": 0}


@producer(DOMAIN, "ramp", readers=1)  # wait for halve before the first frame
def ramp():
    for i in range(FRAMES):
        yield np.arange(4096, dtype=np.float32) + i


@consumer(DOMAIN, "ramp")
@producer(DOMAIN, "half", readers=1)
def halve(frame):
    return frame * 0.5


@consumer(DOMAIN, "half")
def check(frame):
    i = seen["frames"]
    assert frame.dtype == np.float32 and frame.shape == (4096,)
    assert frame[0] == i * 0.5 and frame[-1] == (4095 + i) * 0.5, (i, frame[:2])
    seen["frames"] += 1


if __name__ == "__main__":
    with ShmManager(DOMAIN) as manager:  # owns the domain while the stages run
        workers = [ramp.start(), halve.start()]
        check.run()  # until "half" closes: ramp ends, halve drains and closes its output
        for worker in workers:
            worker.join()
        print(f"checked {seen['frames']} frames, every value exact; exit codes",
              [w.exitcode for w in workers])
        manager.print_stats()
