"""``facetag bench``: our layers against their torch.nn twins, eager and compiled
(layers.py, resnet_twin.py), busy processes beside them (load.py), and the whole pipeline
on a folder of photos (photos.py); memory.py is the one memory helper."""

from facetag.bench.layers import BenchSpec, memory_probe, peak_memory, profile_nets, run_bench

__all__ = ["BenchSpec", "memory_probe", "peak_memory", "profile_nets", "run_bench"]
