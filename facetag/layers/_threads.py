"""Loops of many small tensor calls, run block-parallel so that they hold on a busy CPU.

torch runs each call on its intra-op (OpenMP) threads, gives every thread a fixed share
and returns when the last share is done. A loop of a few hundred small calls (the im2col
and Winograd grad_weight blocks of facetag.layers.conv_fast, 0.1-10 ms each) therefore
waits once per call for its slowest thread, and when another process holds one of the
cores that thread is off the core for a scheduler time slice (milliseconds) at a time: on
the 2-core dev box, beside one busy process, a training step of the benchmark CNN took
2.5x longer with torch's 2 threads than with 1 (experiments/LOG.md, issue 15).

``for_each`` turns such a loop inside out: its tasks are the parallel unit. Up to
``torch.get_num_threads()`` worker threads, each running torch with ONE intra-op thread,
take the next task from a shared counter, so a worker whose core is taken simply does
fewer tasks, and the loop waits once, at its end. torch releases the GIL inside its
kernels, so the workers' calls overlap; their Python glue is a few per cent of a task.

Results stay deterministic: a loop splits its blocks into ``chunks`` fixed by the block
count and the thread count alone, each chunk sums its blocks in order into its own slot,
and the caller adds the slots in order. Which worker ran which chunk never matters.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

# Chunks per worker: enough that a worker slowed to a third of a core by another process
# holds up the end of the loop by at most ~1/8 of it (2 workers, 8 chunks), few enough that
# each chunk still sums several blocks in place. A granularity, not a speed constant.
CHUNKS_PER_WORKER = 4

_state = threading.local()  # .worker: True inside a pool thread
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _init_worker() -> None:
    _state.worker = True
    # torch sets a thread's intra-op count lazily, from the process-wide setting, on its first
    # parallel call: trigger that first, so that it cannot undo the 1 set next.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _start_pool(n: int) -> ThreadPoolExecutor:
    """n worker threads, all started and single-threaded before this returns.

    NOTE: torch.set_num_threads(1) in a worker also sets the process-wide count that
    threads started later inherit, so the caller sets its own count again once every
    worker has set its own (a barrier holds them until all n exist).
    """
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="facetag-blocks", initializer=_init_worker)
    barrier = threading.Barrier(n + 1)
    started = [pool.submit(barrier.wait) for _ in range(n)]
    barrier.wait()
    for f in started:
        f.result()
    torch.set_num_threads(caller_threads)
    return pool


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = _start_pool(n), n
        return _pool


def _forget_pool() -> None:
    """After a fork the child has none of the parent's threads: start afresh when needed."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def workers() -> int:
    """How many tasks ``for_each`` runs at once here: torch's intra-op thread count, or 1
    inside a worker (a nested loop runs inline)."""
    return 1 if getattr(_state, "worker", False) else torch.get_num_threads()


def chunks(count: int, n_workers: int) -> list[range]:
    """range(count) split into K = min(count, CHUNKS_PER_WORKER * n_workers) contiguous
    chunks of near-equal length (the first count % K one longer)."""
    K = max(1, min(count, CHUNKS_PER_WORKER * n_workers))
    size, extra = divmod(count, K)
    bounds = [k * size + min(k, extra) for k in range(K + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(K)]


def for_each(count: int, task: Callable[[int, int], None], parallel: bool = True) -> None:
    """task(worker, i) for every i in range(count), on up to ``workers()`` threads.

    ``worker`` (0 <= worker < workers()) names the thread running the task, so the task can
    keep per-worker buffers; the tasks must write disjoint outputs. Inline (worker 0, in
    order, with the caller's own intra-op threads) when parallel is False (autograd records
    the task's ops: the caller's graph must see them), when there is one task or one thread.
    The tasks see the caller's grad and inference modes. The first exception is re-raised
    after every started task has finished.
    """
    n = min(workers(), count)
    if not parallel or n <= 1:
        for i in range(count):
            task(0, i)
        return
    pool = _get_pool(workers())
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    counter = itertools.count()  # next() on it is atomic under the GIL
    failed = threading.Event()

    def drain(worker: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while not failed.is_set() and (i := next(counter)) < count:
                try:
                    task(worker, i)
                except BaseException:
                    failed.set()
                    raise

    futures: list[Future[None]] = [pool.submit(drain, w) for w in range(n)]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise errors[0]
