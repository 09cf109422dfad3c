"""torchvision's kernels loaded without torchvision.ops: the same answers, less import."""

import subprocess
import sys

import pytest
import torch

from facetag import vision_ops


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1), torch.rand(n, generator=g)


def test_nms_and_roi_align_are_torchvisions():
    import torchvision.ops

    boxes, scores = _boxes(300, 0)
    assert torch.equal(vision_ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    image = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    rois = torch.cat([torch.zeros(20, 1), _boxes(20, 2)[0] * 0.6], dim=1)  # (20, 5)
    ours = vision_ops.roi_align(image, rois, 12, 0.5, -1, True)
    ref = torchvision.ops.roi_align(image, rois, 12, 0.5, -1, True)
    assert torch.equal(ours, ref)


def test_detection_does_not_import_torchvision_ops():
    code = (
        "import sys, torch; import facetag.inference.detect; "
        "b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]); "
        "from facetag.vision_ops import nms; "
        "print(nms(b, torch.tensor([0.9, 0.8]), 0.5).tolist()); "
        "print(sorted(m for m in ('torchvision.ops', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[0]", "[]"]


def test_without_the_extension_library_it_falls_back_to_torchvision_ops(monkeypatch):
    monkeypatch.setattr(vision_ops, "_loaded", False)
    monkeypatch.setattr(vision_ops, "_extension_library", lambda: None)
    boxes, scores = _boxes(50, 3)
    keep = vision_ops.nms(boxes, scores, 0.3)
    assert "torchvision.ops" in sys.modules
    import torchvision.ops

    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.3))


@pytest.fixture(autouse=True)
def _restore_loaded():
    yield
    vision_ops._loaded = True  # the ops stay registered for the rest of the run
