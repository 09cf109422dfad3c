"""Process memory, the one helper every benchmark reads (Linux /proc and getrusage)."""

from __future__ import annotations

import platform
import resource


def peak_rss_mb() -> float:
    """The process's peak resident set so far, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if platform.system() == "Darwin" else kb / 1024


def current_rss_mb() -> float:
    """The process's resident set now, MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Start a fresh peak: return freed heap to the OS (glibc's malloc_trim) and reset the
    kernel's high-water mark to the resident set now (Linux /proc/self/clear_refs).

    Then ``hwm_rss_mb() - current_rss_mb()`` measured later is what the work in between
    added at its peak, not what a warm-up (or a compilation) once held. False where either
    is unavailable (not Linux with glibc): the peak then counts from the process start.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def hwm_rss_mb() -> float:
    """The resident set's high-water mark, MiB (VmHWM; resettable by ``reset_peak_rss``),
    or ``peak_rss_mb()`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
