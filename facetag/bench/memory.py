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
