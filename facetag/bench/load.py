"""Busy-looping processes beside a benchmark (``facetag bench ... --load N``).

A user's machine is rarely quiet, and a library whose threads stall when a core is taken
is slow where it is used; ``busy_load`` makes that case measurable on purpose. Each load
process is a plain Python loop (no torch, no memory to speak of) that stops by itself
when its parent is gone or after ``limit_s``, and the context manager stops them all when
its block ends, whether normally, by an error or by Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

MAX_LOAD = 64
"""The most load processes one benchmark may start."""

# The child checks its parent and its deadline every ~10 ms of spinning.
_BUSY_LOOP = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < end:
    x = 0
    for i in range(100_000):
        x += i
"""


@contextmanager
def busy_load(n: int, limit_s: float = 3600.0) -> Iterator[list[int]]:
    """Run ``n`` busy-looping processes for the duration of the with block; yields their pids.

    Each spins one core's worth of pure-Python work until the block ends (then it is
    killed and reaped), its parent exits (it notices within ~10 ms) or ``limit_s`` passes.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOAD:
        raise ValueError(f"busy_load: expected 0 <= n <= {MAX_LOAD} processes, got {n!r}")
    if not limit_s > 0:
        raise ValueError(f"busy_load: expected limit_s > 0, got {limit_s}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-S", "-c", _BUSY_LOOP, str(os.getpid()), str(limit_s)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
