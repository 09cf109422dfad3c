"""Detector nets: only facetag ops in the training graph, a batch overfits, shapes, BN folding."""

import pytest
import torch
import torch.nn.functional as F

from facetag import layers
from facetag.data.patches import NEG, PART, POS, POS_NO_BOX
from facetag.layers import fused
from facetag.models.detector import DEFAULT_WIDTHS, STAGE_SIZES, Cascade, StageNet
from facetag.training.detector_train import detector_losses


def _graph_nodes(*roots: torch.Tensor) -> set[str]:
    seen: set[int] = set()
    names: set[str] = set()
    stack = [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def _batch(kind: str, N: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = STAGE_SIZES[kind]
    x = torch.randn(N, 3, S, S, generator=g)
    labels = torch.tensor([NEG, POS, PART, POS_NO_BOX, NEG, POS, PART, NEG])[:N]
    offsets = torch.randn(N, 4, generator=g) * 0.1
    return x, labels, offsets


@pytest.mark.parametrize("kind", list(STAGE_SIZES))
def test_detector_graph_has_only_our_functions(kind):
    torch.manual_seed(0)
    net = StageNet(kind).train()
    face, box, _, _ = detector_losses(net, *_batch(kind))
    allowed = {f"{fn.__name__}Backward" for fn in layers.FUNCTIONS} | {"AccumulateGrad"}
    leaked = _graph_nodes(face, box) - allowed
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"


def test_detector_losses_match_torch_reference():
    torch.manual_seed(0)
    net = StageNet("rnet").train()
    twin = StageNet("rnet").train()
    twin.load_state_dict(net.state_dict())
    x, labels, offsets = _batch("rnet")
    face, box, n_box, _ = detector_losses(net, x, labels, offsets)
    torch.autograd.backward([face, box], [torch.tensor(1.0), torch.tensor(0.5 / n_box)])
    logit, pred = twin(x)
    is_face = ((labels == POS) | (labels == POS_NO_BOX)).float()
    labelled = labels != PART
    has_box = (labels == POS) | (labels == PART)
    ref_face = F.binary_cross_entropy_with_logits(logit.view(-1)[labelled], is_face[labelled])
    ref_box = F.smooth_l1_loss(pred.view(-1, 4)[has_box], offsets[has_box], reduction="sum")
    (ref_face + 0.5 * ref_box / int(has_box.sum())).backward()
    torch.testing.assert_close(face, ref_face.detach())
    torch.testing.assert_close(box, ref_box.detach())
    assert n_box == int(has_box.sum())
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_rnet_overfits_one_batch():
    torch.manual_seed(0)
    net = StageNet("rnet", (8, 16, 16, 32)).train()
    x, labels, offsets = _batch("rnet")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        face, box, n_box, _ = detector_losses(net, x, labels, offsets)
        torch.autograd.backward([face, box], [torch.tensor(1.0), torch.tensor(1.0 / n_box)])
        opt.step()
    assert face.item() < 0.05, face.item()
    assert box.item() / n_box < 1e-3, box.item()


def test_stage_output_shapes():
    pnet = StageNet("pnet").eval()
    with torch.no_grad():
        logit, box = pnet(torch.randn(2, 3, 100, 61))
        assert logit.shape == (2, 1, 45, 26)
        assert box.shape == (2, 4, 45, 26)
        for kind in ("rnet", "onet"):
            S = STAGE_SIZES[kind]
            logit, box = StageNet(kind).eval()(torch.randn(3, 3, S, S))
            assert (logit.shape, box.shape) == ((3, 1, 1, 1), (3, 4, 1, 1))


@pytest.mark.parametrize("kind", list(STAGE_SIZES))
def test_fuse_keeps_eval_outputs(kind):
    torch.manual_seed(0)
    net = StageNet(kind).train()
    S = STAGE_SIZES[kind]
    for _ in range(3):  # move the running statistics away from their initial values
        net(torch.randn(16, 3, S, S) * 2 + 0.5)
    net.eval()
    x = torch.randn(4, 3, S + 8, S + 8)
    with torch.no_grad():
        before = net(x)
        net.fuse()
        after = net(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, fused.BatchNormAct2d) for m in net.modules())


def test_stage_and_cascade_reject_bad_arguments():
    with pytest.raises(ValueError, match="expected kind in"):
        StageNet("xnet")
    with pytest.raises(ValueError, match="expected 3 widths >= 1 for pnet"):
        StageNet("pnet", (8, 8))
    with pytest.raises(ValueError, match="expected stages starting with 'pnet'"):
        Cascade(DEFAULT_WIDTHS, ["rnet"])
