"""busy_load: N busy processes while its block runs, none after it, however it ends."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from facetag.bench.load import MAX_LOAD, busy_load


def _alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")


def test_busy_load_starts_n_spinning_processes_and_stops_them():
    with busy_load(2) as pids:
        assert len(pids) == 2
        time.sleep(1.0)
        assert all(_alive(p) for p in pids)
        assert all(_cpu_seconds(p) > 0.1 for p in pids)  # they spin, not sleep
    assert not any(_alive(p) for p in pids)


def test_busy_load_zero_starts_nothing():
    with busy_load(0) as pids:
        assert pids == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_busy_load_stops_its_processes_on_error_and_ctrl_c(error):
    with pytest.raises(error), busy_load(2) as pids:
        raise error("stop")
    assert not any(_alive(p) for p in pids)


def test_busy_load_processes_end_when_the_benchmark_is_killed():
    # SIGKILL skips every finally: the children notice their parent is gone by themselves.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import time
                from facetag.bench.load import busy_load
                with busy_load(2) as pids:
                    print(*pids, flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    assert all(_alive(p) for p in pids)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_busy_load_processes_stop_at_their_time_limit():
    with busy_load(1, limit_s=0.3) as pids:
        deadline = time.monotonic() + 10
        while _alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pids[0])


@pytest.mark.parametrize("n", [-1, MAX_LOAD + 1, True, 1.5])
def test_busy_load_rejects_bad_counts(n):
    with pytest.raises(ValueError, match=r"busy_load: expected 0 <= n"), busy_load(n):
        pass
