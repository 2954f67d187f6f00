"""Tap a running graph from an unrelated process: this script starts a graph, then a
second Python interpreter (not a child of the runtime's workers) attaches to the
domain by name, subscribes to the source's output and prints what it sees."""

import os
import subprocess
import sys
import textwrap

from multiqueue.graph import NullSink, Runtime, SignalSource

TAP = textwrap.dedent("""
    import sys
    import multiqueue
    with multiqueue.attach(sys.argv[1]) as graph:
        print("ports:", graph.ports, flush=True)
        for n, frame in enumerate(graph.subscribe("src.out")):
            print(f"frame t={frame.timestamp} shape={frame.array.shape} peak={frame.array.max():.2f}")
            if n == 4:
                break
""")

if __name__ == "__main__":
    domain = f"tap-{os.getpid()}"
    rt = Runtime(domain)
    src = rt.add(SignalSource("sine", rate=20 * 256, frame=256, realtime=True), name="src")
    rt.connect(src["out"], rt.add(NullSink(), name="sink")["in"])
    rt.start()
    tap = subprocess.run([sys.executable, "-c", TAP, domain], capture_output=True, text=True, timeout=60)
    rt.stop()
    print(tap.stdout, tap.stderr, sep="")
    sys.exit(0 if tap.returncode == 0 and tap.stdout.count("frame t=") == 5 else 1)
