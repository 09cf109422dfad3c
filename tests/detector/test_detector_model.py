"""Detector nets: only facetag ops in the training graph, a batch overfits, shapes, BN folding."""

import pytest
import torch
import torch.nn.functional as F

from facetag import layers
from facetag.data.patches import NEG, PART, POS, POS_NO_BOX
from facetag.layers import MaxPool2d, fused
from facetag.models.detector import (
    DEFAULT_WIDTHS,
    MIRROR,
    STAGE_SIZES,
    Cascade,
    StageNet,
    stage_input,
)
from facetag.models.fold import ConvPoolAct
from facetag.training.detector_losses import augment, detector_losses, landmark_error


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
    x, labels, offsets = _batch(kind)
    marks = torch.rand(8, 10)
    marks[::3] = float("nan")  # some patches without landmarks
    loss = detector_losses(net, x, labels, offsets, marks, ohem=0.7)
    roots = [loss.face, loss.box] + ([loss.marks] if loss.marks is not None else [])
    assert (loss.marks is not None) == (kind == "onet")
    allowed = {f"{fn.__name__}Backward" for fn in layers.FUNCTIONS} | {"AccumulateGrad"}
    leaked = _graph_nodes(*roots) - allowed
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"


def test_detector_losses_match_torch_reference():
    torch.manual_seed(0)
    net = StageNet("rnet").train()
    twin = StageNet("rnet").train()
    twin.load_state_dict(net.state_dict())
    x, labels, offsets = _batch("rnet")
    loss = detector_losses(net, x, labels, offsets)
    face, box, n_box = loss.face, loss.box, loss.n_box
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
        loss = detector_losses(net, x, labels, offsets)
        torch.autograd.backward(*loss.roots(box_weight=1.0, landmark_weight=1.0))
        opt.step()
    assert loss.face.item() < 0.05, loss.face.item()
    assert loss.box.item() / loss.n_box < 1e-3, loss.box.item()


def test_onet_overfits_landmarks_of_one_batch():
    torch.manual_seed(0)
    net = StageNet("onet", (8, 8, 16, 16, 32)).train()
    x, labels, offsets = _batch("onet")
    marks = torch.rand(8, 10, generator=torch.Generator().manual_seed(1))
    marks[labels == NEG] = float("nan")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = detector_losses(net, x, labels, offsets, marks)
        torch.autograd.backward(*loss.roots(box_weight=1.0, landmark_weight=1.0))
        opt.step()
    assert loss.n_marks == int((labels != NEG).sum())
    assert loss.marks is not None
    assert loss.marks.item() / loss.n_marks < 1e-3, loss.marks.item()


def test_landmark_error_is_in_units_of_the_eye_distance():
    from facetag.data.patches import PatchSet

    true = torch.tensor([[0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8]])  # eyes 0.4 apart

    class Shifted(torch.nn.Module):  # predicts every point 0.04 to the right
        landmarks = True

        def outputs(self, x):
            N = x.shape[0]
            return (
                None,
                None,
                (true + torch.tensor([0.04, 0.0] * 5)).view(1, 10, 1, 1).expand(N, 10, 1, 1),
            )

    patches = PatchSet(
        torch.zeros(2, 3, 48, 48, dtype=torch.uint8),
        torch.tensor([POS, NEG]),
        torch.zeros(2, 4),
        torch.cat([true, torch.full((1, 10), float("nan"))]),
    )
    assert landmark_error(Shifted(), patches, "cpu") == pytest.approx(0.1)  # 0.04 / 0.4


def test_landmark_loss_matches_torch_reference():
    torch.manual_seed(0)
    net = StageNet("onet", (8, 8, 16, 16, 32)).train()
    x, labels, offsets = _batch("onet")
    marks = torch.rand(8, 10)
    marks[[0, 4, 7]] = float("nan")
    loss = detector_losses(net, x, labels, offsets, marks)
    _, _, lm = net.outputs(x)
    keep = ~torch.isnan(marks).any(dim=1)
    ref = F.smooth_l1_loss(lm.view(8, 10)[keep], marks[keep], reduction="sum")
    assert loss.n_marks == 5
    torch.testing.assert_close(loss.marks, ref)
    near_l1 = detector_losses(net, x, labels, offsets, marks, landmark_beta=0.02)  # the phase's
    ref = F.smooth_l1_loss(lm.view(8, 10)[keep], marks[keep], reduction="sum", beta=0.02)
    torch.testing.assert_close(near_l1.marks, ref)


def test_ohem_counts_only_the_hardest_share_of_face_losses():
    torch.manual_seed(0)
    net = StageNet("rnet", (8, 16, 16, 32)).train()
    x, labels, offsets = _batch("rnet")
    all_loss = detector_losses(net, x, labels, offsets, ohem=1.0)
    hard = detector_losses(net, x, labels, offsets, ohem=0.5)
    logit = all_loss.logits
    labelled = labels != PART  # 6 labelled patches: the 3 largest losses count
    y = ((labels == POS) | (labels == POS_NO_BOX)).float()
    each = F.binary_cross_entropy_with_logits(logit, y, reduction="none")[labelled]
    torch.testing.assert_close(hard.face, each.topk(3).values.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(all_loss.face, each.mean(), rtol=1e-4, atol=1e-5)


def test_flip_mirrors_landmarks_and_swaps_sides():
    x = torch.zeros(1, 3, 48, 48)
    offsets = torch.zeros(1, 4)
    marks = torch.tensor([[0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8]])
    for seed in range(20):  # some seed flips it
        _, _, out = augment(x, offsets, torch.Generator().manual_seed(seed), marks)
        assert out is not None
        if not torch.equal(out, marks):
            break
    pts = marks.view(5, 2)[list(MIRROR)]
    want = torch.stack([1 - pts[:, 0], pts[:, 1]], 1).view(1, 10)
    torch.testing.assert_close(out, want)


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
    # every pool follows a PReLU with slopes 0.25 (non-decreasing): pooled first
    pools = {"pnet": 1, "rnet": 2, "onet": 3}[kind]
    assert sum(isinstance(m, ConvPoolAct) for m in net.body) == pools
    assert not any(isinstance(m, MaxPool2d) for m in net.body)


def test_stage_and_cascade_reject_bad_arguments():
    with pytest.raises(ValueError, match="expected kind in"):
        StageNet("xnet")
    with pytest.raises(ValueError, match="expected 3 widths >= 1 for pnet"):
        StageNet("pnet", (8, 8))
    with pytest.raises(ValueError, match="expected stages starting with 'pnet'"):
        Cascade(DEFAULT_WIDTHS, ["rnet"])


@pytest.mark.parametrize("kind", list(STAGE_SIZES))
def test_fold_normalization_takes_pixels(kind):
    torch.manual_seed(0)
    net = StageNet(kind).train()
    S = STAGE_SIZES[kind]
    net(torch.randn(16, 3, S, S))  # running statistics away from their initial values
    net.fuse()
    pixels = torch.randint(0, 256, (4, 3, S + 4, S + 4)).float()
    with torch.no_grad():
        before = net.outputs(stage_input(net, pixels))
        net.fold_normalization()
        assert net.takes_pixels
        after = net.outputs(stage_input(net, pixels))  # the pixels as they are
    for a, b in zip(before, after, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fold_normalization_needs_a_fused_net():
    with pytest.raises(ValueError, match="call fuse\\(\\) first"):
        StageNet("pnet").fold_normalization()
