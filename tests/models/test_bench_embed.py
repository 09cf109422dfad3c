"""bench_embed runs both networks on the same chips and reports comparable figures (a smoke
test: the speed itself is measured by hand, not asserted)."""

import numpy as np
import pytest

from facetag.bench.embed import bench_embed, dlib_chips
from tests.models.dlib_support import needs_dlib


@needs_dlib
def test_bench_embed_reports_both_networks():
    from skimage import data

    chips = dlib_chips(data.astronaut())[:1] * 2
    result = bench_embed(chips, batch_sizes=(2,), repeats=1)
    assert result["chips"] == 2
    assert result["ours"]["best"] > 0
    assert set(result["dlib"]["chips_per_s"]) == {"list", "one_by_one"}
    assert result["ratio"] == pytest.approx(result["ours"]["best"] / result["dlib"]["best"])
    assert result["max_abs_diff"] <= 1e-4  # the same descriptors, so a fair comparison


def test_bench_embed_rejects_chips_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"bench_embed: expected chips of shape \(150, 150, 3\)"):
        bench_embed([np.zeros((112, 112, 3), np.uint8)])
