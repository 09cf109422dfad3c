"""``facetag bench``: our layers against their torch.nn twins (layers.py), and the
whole pipeline on a folder of photos (photos.py); memory.py is the one memory helper."""

from facetag.bench.layers import BenchSpec, memory_probe, peak_memory, profile_pair, run_bench

__all__ = ["BenchSpec", "memory_probe", "peak_memory", "profile_pair", "run_bench"]
