"""ArcFace head: gradients against the reference, |cos| == 1, module, graph, errors."""

import math

import pytest
import torch

from facetag.gradcheck.core import run_case
from facetag.gradcheck.margin import CASES, arc_head_reference, arc_margin_reference
from facetag.layers import loss, margin, normalize
from facetag.layers.loss import cross_entropy
from facetag.layers.margin import ArcMarginHead, arc_margin, cosine


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_margin_case(case):
    result = run_case(case)
    assert result.passed, result


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arc_margin_head_matches_reference(easy_margin):
    torch.manual_seed(0)
    head = ArcMarginHead(16, 10, scale=30.0, margin=0.5, easy_margin=easy_margin)
    x = torch.randn(12, 16, requires_grad=True)
    labels = torch.randint(0, 10, (12,))
    out = head(x, labels)
    weight = head.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = arc_head_reference(x_ref, weight, labels, 30.0, 0.5, easy_margin)
    grad_out = torch.randn(12, 10)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(head.weight.grad, weight.grad)


def test_arc_margin_gradient_is_finite_at_cos_plus_minus_one():
    # The reference's sqrt(clamp(1 - cos^2)) has an infinite slope at |cos| == 1 (its
    # autograd gives inf or nan); we drop the sine term there, as the clamp does beyond it.
    cos = torch.tensor([[1.0, 0.2], [0.3, -1.0], [0.5, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    out = arc_margin(cos, labels, scale=10.0, margin=0.5)
    out.backward(torch.ones_like(out))
    s, m = 10.0, 0.5
    expected = torch.full((3, 2), s)
    expected[0, 0] = s * math.cos(m)  # at cos == 1 only the cos(m) term is left
    expected[1, 1] = s  # cos == -1 is in the fallback branch, phi = cos - m*sin(m)
    expected[2, 0] = s * (math.cos(m) + math.sin(m) * 0.5 / math.sqrt(0.75))
    torch.testing.assert_close(cos.grad, expected)
    torch.testing.assert_close(out, arc_margin_reference(cos.detach(), labels, s, m))


def test_arc_margin_phi_is_cos_of_theta_plus_m():
    theta = torch.tensor([0.3, 1.0, 2.0])
    cos = torch.stack([theta.cos(), torch.zeros(3)], dim=1)  # (3, 2), targets in column 0
    out = arc_margin(cos, torch.zeros(3, dtype=torch.int64), scale=1.0, margin=0.5)
    torch.testing.assert_close(out[:, 0], (theta + 0.5).cos())


def test_arc_margin_head_without_labels_is_scaled_cosine():
    torch.manual_seed(0)
    head = ArcMarginHead(8, 5, scale=16.0)
    x = torch.randn(3, 8)
    expected = (
        16.0
        * torch.nn.functional.normalize(x)
        @ torch.nn.functional.normalize(head.weight.detach()).t()
    )
    torch.testing.assert_close(head(x), expected)


def test_arc_margin_head_parameters():
    head = ArcMarginHead(128, 40)
    assert list(head.state_dict()) == ["weight"]
    assert head.weight.shape == (40, 128)
    bound = math.sqrt(6 / (128 + 40))  # Xavier-uniform
    assert head.weight.abs().max() <= bound
    assert "in_features=128, num_classes=40, scale=30.0, margin=0.5" in repr(head)


def test_arc_margin_head_graph_has_only_our_functions():
    torch.manual_seed(0)
    head = ArcMarginHead(8, 4)
    x = torch.randn(6, 8, requires_grad=True)
    labels = torch.randint(0, 4, (6,))
    total = cross_entropy(head(x, labels), labels)
    allowed = {
        f"{fn.__name__}Backward" for fn in margin.FUNCTIONS + normalize.FUNCTIONS + loss.FUNCTIONS
    } | {"AccumulateGrad"}
    seen, stack = set(), [total.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    leaked = {type(node).__name__ for node in seen} - allowed
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"


def test_arc_margin_head_learns_separable_classes():
    # Four tight clusters; training only the head must classify them all with margin.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    labels = torch.arange(32) % 4
    x = centres[labels] + 0.1 * torch.randn(32, 16, generator=g)
    torch.manual_seed(0)
    head = ArcMarginHead(16, 4, scale=16.0, margin=0.3)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        opt.zero_grad()
        total = cross_entropy(head(x, labels), labels)
        first = total.item() if first is None else first
        total.backward()
        opt.step()
    assert total.item() < 0.2 * first
    assert torch.equal(head(x).argmax(1), labels)


def test_cosine_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"cosine: expected x \(N, D\) and w \(P, D\) with the"):
        cosine(torch.zeros(2, 3), torch.zeros(4, 5))


def test_arc_margin_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"arc_margin: expected labels in \[0, 3\)"):
        arc_margin(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_arc_margin_rejects_float_labels():
    with pytest.raises(ValueError, match=r"arc_margin: expected labels of shape \(2,\) and dtyp"):
        arc_margin(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


def test_arc_margin_rejects_margin_past_half_pi():
    with pytest.raises(ValueError, match=r"ArcMarginHead: expected 0 <= margin < pi/2"):
        ArcMarginHead(8, 4, margin=2.0)


def test_arc_margin_head_rejects_wrong_embedding_size():
    with pytest.raises(ValueError, match=r"ArcMarginHead: expected embeddings of shape \(N, 8\)"):
        ArcMarginHead(8, 4)(torch.zeros(2, 7))


def test_margin_functions_lists_every_function():
    assert (margin.CosineFn, margin.ArcMarginFn) == margin.FUNCTIONS
