"""The block-parallel loop under conv's grad_weight: every task once, deterministic sums,
torch's thread settings left as they were, errors passed on."""

import os
import threading

import pytest
import torch

from facetag.layers import _threads, conv_fast
from facetag.layers.conv import conv2d_grad_weight


@pytest.fixture
def two_threads():
    """torch with 2 intra-op threads (the pool's size) for one test, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_chunks_cover_every_block_once_in_order():
    for count in (1, 3, 8, 9, 31):
        for n in (1, 2, 3):
            parts = _threads.chunks(count, n)
            assert [i for r in parts for i in r] == list(range(count))
            assert len(parts) == min(count, _threads.CHUNKS_PER_WORKER * n)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_for_each_runs_every_task_once_on_single_threaded_workers(two_threads):
    seen: dict[int, tuple[str, int]] = {}
    lock = threading.Lock()

    def task(worker: int, i: int) -> None:
        with lock:
            assert i not in seen
            seen[i] = (threading.current_thread().name, torch.get_num_threads())
        assert 0 <= worker < 2

    _threads.for_each(40, task)
    assert sorted(seen) == list(range(40))
    assert all(name.startswith("facetag-blocks") for name, _ in seen.values())
    assert {n for _, n in seen.values()} == {1}  # each worker runs torch on one thread


def test_for_each_leaves_torch_thread_count_for_later_threads(two_threads):
    _threads.for_each(4, lambda w, i: None)
    assert torch.get_num_threads() == 2
    counts: list[int] = []
    t = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert counts == [2]  # a thread started later still gets the process's setting


def test_for_each_inline_when_not_parallel_or_nested(two_threads):
    order: list[tuple[str, int]] = []
    _threads.for_each(3, lambda w, i: order.append((threading.current_thread().name, i)), False)
    assert order == [(threading.current_thread().name, i) for i in range(3)]

    inner: list[str] = []

    def outer(worker: int, i: int) -> None:
        _threads.for_each(2, lambda w, j: inner.append(threading.current_thread().name))

    _threads.for_each(2, outer)
    assert len(inner) == 4
    assert all(name.startswith("facetag-blocks") for name in inner)  # nested loops ran inline


def test_for_each_passes_the_first_error_on(two_threads):
    def task(worker: int, i: int) -> None:
        if i == 5:
            raise ValueError("block 5")

    with pytest.raises(ValueError, match="block 5"):
        _threads.for_each(20, task)
    _threads.for_each(3, lambda w, i: None)  # the pool still works afterwards


def test_for_each_keeps_the_callers_grad_and_inference_modes(two_threads):
    modes: list[tuple[bool, bool]] = []

    def task(worker: int, i: int) -> None:
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    with torch.no_grad():
        _threads.for_each(4, task)
    with torch.inference_mode():
        _threads.for_each(4, task)
    assert modes[:4] == [(False, False)] * 4
    assert modes[4:] == [(False, True)] * 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_for_each_works_in_a_forked_child(two_threads):
    _threads.for_each(4, lambda w, i: None)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool, not the parent's (absent) threads
        try:
            done: list[int] = []
            _threads.for_each(6, lambda w, i: done.append(i))
            os._exit(0 if sorted(done) == list(range(6)) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("method", ["im2col", "winograd"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_grad_weight_block_parallel_is_deterministic_and_right(
    two_threads, monkeypatch, method, memory_format
):
    # Small blocks, so that both workers take many; the result must not depend on which
    # worker summed which block (bit for bit across runs) and must match the inline loop.
    monkeypatch.setattr(conv_fast, "IM2COL_BLOCK_BYTES", 8192)
    monkeypatch.setattr(conv_fast, "WINOGRAD_BLOCK_BYTES", 8192)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, 10, 9, generator=g).contiguous(memory_format=memory_format)
    grad_out = torch.randn(12, 8, 10, 9, generator=g).contiguous(memory_format=memory_format)
    args = (grad_out, x, (8, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    runs = [conv2d_grad_weight(*args, method=method) for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    expected = conv2d_grad_weight(*args, method="corr")
    torch.testing.assert_close(runs[0], expected, rtol=1e-4, atol=1e-4)
