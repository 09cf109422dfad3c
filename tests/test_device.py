"""facetag.device: the device choice and the training allocator setting."""

import platform
import subprocess
import sys

import pytest

from facetag import device
from facetag.errors import DeviceError

# A 64 MiB block is mmap'd by glibc and unmapped when freed: the resident set falls back.
# With freed memory kept, it stays in the heap for the next step: the resident set stays.
_PROBE = """
import sys, torch
from facetag.device import keep_freed_memory
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
keep = sys.argv[1] == 'keep'
if keep:
    assert keep_freed_memory()
before = rss()
x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
del x
print(round(rss() - before))
"""


def _kept_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_keeps_a_freed_block_resident_for_the_next_step():
    assert _kept_mib("default") < 16  # glibc's default: unmapped when freed
    assert _kept_mib("keep") >= 60  # kept in the heap, ready for reuse


def test_keep_freed_memory_says_no_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert device.keep_freed_memory() is False


def test_cuda_without_a_gpu_is_an_error_not_a_fall_back(monkeypatch):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device cuda: expected a CUDA GPU, got none"):
        device.resolve_device("cuda")
    assert device.resolve_device("auto") == "cpu"
