"""FaceBatcher: crops of several photos embedded together, handed back per photo in order."""

from __future__ import annotations

import torch
from torch import nn

from facetag.inference.pipeline import FaceBatcher


class Mean(nn.Module):
    """A stand-in embedder: each crop's mean pixel, repeated D times."""

    embedding_dim = 4

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=False)[:, None].expand(-1, 4).contiguous()


def crops(*values: int) -> torch.Tensor:
    return (
        torch.stack([torch.full((3, 2, 2), v, dtype=torch.uint8) for v in values])
        if values
        else torch.zeros((0, 3, 2, 2), dtype=torch.uint8)
    )


def test_face_batcher_returns_each_photo_once_in_order_with_its_own_crops():
    batcher: FaceBatcher[str] = FaceBatcher(Mean(), 4, "cpu", batch_size=3, max_photos=10)
    out = batcher.add("a", crops(10, 20))
    out += batcher.add("b", crops())  # a photo without faces waits its turn
    assert out == []
    out += batcher.add("c", crops(30, 40))  # 4 crops >= 3: one batch
    out += batcher.add("d", crops(50))
    out += batcher.flush()
    assert [name for name, _ in out] == ["a", "b", "c", "d"]
    shapes = [tuple(v.shape) for _, v in out]
    assert shapes == [(2, 4), (0, 4), (2, 4), (1, 4)]
    norms = [v[:, 0].tolist() for _, v in out]
    assert norms[0][0] != norms[0][1]  # L2-normalised per crop; each photo gets its own rows
    assert batcher.flush() == []


def test_face_batcher_flushes_at_max_photos_even_with_few_crops():
    batcher: FaceBatcher[int] = FaceBatcher(Mean(), 4, "cpu", batch_size=64, max_photos=2)
    assert batcher.add(1, crops(1)) == []
    assert [k for k, _ in batcher.add(2, crops())] == [1, 2]
