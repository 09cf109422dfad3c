"""Fused batch norm + activation: gradients, the compiled path, torch parity, memory, errors."""

import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
from torch import nn

from facetag.gradcheck.core import TORCH_TOLERANCE, run_case
from facetag.gradcheck.fused import CASES, bn_act, bn_act_inputs
from facetag.layers import fused
from facetag.layers.compile import MaybeCompiled
from facetag.layers.fused import (
    COMPILE_MIN_NUMEL,
    FUNCTIONS,
    BatchNormAct2d,
    batch_norm_act,
    compile_failures,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_case(case):
    result = run_case(case)
    assert result.passed, result


def _close(actual, expected):
    """Within the project's float32 tolerance against torch (relative to max(|x|, 1))."""
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TORCH_TOLERANCE * scale, f"max error {err:.3g} at scale {scale:.3g}"


def _layout(t):
    cl = t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl and not t.is_contiguous() else torch.contiguous_format


def _run(fn, inputs, seed=1):
    """Output and gradients of every input that requires grad, at fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.to(out.dtype).contiguous(memory_format=_layout(out)))
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def _twin(C, activation="prelu"):
    act = nn.PReLU(C) if activation == "prelu" else nn.ReLU()
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(C), act=act))


# Large enough to take the compiled path; kink-free inputs (see bn_act_inputs), so that a
# different rounding in torch cannot flip the sign of a pre-activation.
# NOTE: the default suite compiles one variant only (PReLU, batch statistics, contiguous,
# with weight and bias, more than 4096 values per channel: inductor specialises on that);
# the other variants compile in the slow tests.
LARGE = (6, 16, 32, 32)


@pytest.mark.parametrize(
    ("activation", "P", "training", "layout"),
    [
        ("prelu", 16, True, "contiguous"),
        pytest.param("relu", 0, True, "channels_last", marks=pytest.mark.slow),
        pytest.param("leaky_relu", 0, False, "contiguous", marks=pytest.mark.slow),
        pytest.param("prelu", 1, False, "channels_last", marks=pytest.mark.slow),
    ],
)
def test_batch_norm_act_compiled_path_matches_torch_and_eager(activation, P, training, layout):
    assert LARGE[0] * LARGE[1] * LARGE[2] * LARGE[3] >= COMPILE_MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    inputs = bn_act_inputs(
        LARGE, torch.float32, g, prelu_parameters=P, training=training, layout=layout
    )
    compiled = _run(bn_act(True, activation, training=training, negative_slope=0.2), inputs)
    reference = _run(bn_act(False, activation, training=training, negative_slope=0.2), inputs)

    def eager(x, *params):
        params = list(params)
        w, b = params.pop(0), params.pop(0)
        a = params.pop(0) if activation == "prelu" else None
        rm, rv = (None, None) if training else params
        return batch_norm_act(
            x, rm, rv, w, b, training, 0.1, 1e-5, activation, 0.2, a, use_compile=False
        )

    eager_results = _run(eager, inputs)
    assert compile_failures() == {}
    key = f"{activation}_{'batch' if training else 'running'}"
    assert key in fused._forward.compiled  # the compiled path did run
    assert key in fused._backward.compiled
    for ours, ref, other in zip(compiled, reference, eager_results, strict=True):
        _close(ours, ref)
        _close(other, ref)
    assert compiled[0].is_contiguous(memory_format=_layout(inputs[0]))


def test_batch_norm_act_compiled_path_does_not_recompile_for_a_new_batch_size():
    from torch._dynamo.utils import counters

    # NOTE: inductor does specialise once on the reduction size (one graph for at most
    # 4096 values per channel, one above), so all the batch sizes here stay above it.
    m = BatchNormAct2d(16, activation="prelu")
    for N in (8, 6, 5):
        x = torch.randn(N, 16, 32, 32, requires_grad=True)
        before = counters["stats"]["unique_graphs"]
        z = m(x)
        z.backward(torch.randn_like(z))  # dense, like a real upstream gradient
        if N != 8:  # the first batch size may compile; later ones must reuse the graphs
            assert counters["stats"]["unique_graphs"] == before
    assert compile_failures() == {}
    assert "prelu_batch" in fused._forward.compiled
    assert "prelu_batch" in fused._backward.compiled


def test_batch_norm_act_compile_failure_warns_and_falls_back(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            raise TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = MaybeCompiled(fused.bn_act_forward, "batch_norm_act")
    g = torch.Generator().manual_seed(0)
    x, w, b = bn_act_inputs((2, 3, 4, 4), torch.float32, g)
    args = (x.detach(), w.detach(), b.detach(), None, None, None, True, 1e-5, "relu", 0.0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for bn_act_forward"):
        z = kernel("relu_batch", *args)[0]
    assert torch.equal(z, fused.bn_act_forward(*args)[0])
    assert kernel.failures == {"relu_batch": "InvalidCxxCompiler: No working C++ compiler found"}
    kernel("relu_batch", *args)  # no second attempt, no second warning
    assert calls == ["bn_act_forward_relu_batch"]


@pytest.mark.slow
def test_batch_norm_act_falls_back_to_eager_without_a_compiler(tmp_path):
    # A fresh process with no usable C++ compiler and an empty compile cache: the op must
    # warn, remember why, and still return torch's values.
    code = textwrap.dedent(
        """
        import warnings
        import torch, torch._inductor.config
        torch._inductor.config.cpp.cxx = (None, "no-such-compiler-facetag")
        from facetag.layers.fused import batch_norm_act, compile_failures
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 16, 32, 32, generator=g, requires_grad=True)
        w = torch.ones(16, requires_grad=True)
        a = torch.full((16,), 0.25)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z = batch_norm_act(x, None, None, w, None, True, activation="prelu", prelu_weight=a)
            z.sum().backward()
        F = torch.nn.functional
        ref = F.prelu(F.batch_norm(x.detach(), None, None, training=True), a)
        assert (z.detach() - ref).abs().max() < 1e-4, "wrong values"
        assert any("torch.compile failed" in str(w.message) for w in caught), caught
        print(sorted(compile_failures()))
        """
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bn_act_forward[prelu_batch]" in result.stdout


@pytest.mark.parametrize(
    ("activation", "size"),
    [
        ("relu", "small"),
        ("leaky_relu", "small"),
        ("prelu", "small"),
        ("prelu", "large"),
        pytest.param("relu", "large", marks=pytest.mark.slow),
        pytest.param("leaky_relu", "large", marks=pytest.mark.slow),
    ],
)
def test_batch_norm_act_gradient_at_zero_matches_torch(activation, size):
    # Values -1, 0, 1 in equal numbers per channel: the mean is exactly 0, so every 0
    # normalises to exactly y = 0 (bias 0), the kink; there torch takes the slope side
    # (ReLU: gradient 0), and an O(1) gradient would differ if we did not.
    N, C, H, W = (2, 2, 2, 3) if size == "small" else LARGE
    assert (N * H * W) % 3 == 0
    x = (torch.arange(N * C * H * W) % 3 - 1.0).view(C, N, H, W).transpose(0, 1)
    x = x.contiguous()
    w = torch.linspace(0.5, 1.5, C)
    b = torch.zeros(C)
    a = torch.linspace(-0.2, 0.3, C)
    P = C if activation == "prelu" else 0
    inputs = [t.requires_grad_() for t in (x, w, b, a)[: 4 if P else 3]]
    ours = _run(bn_act(True, activation, negative_slope=0.2), inputs)
    ref = _run(bn_act(False, activation, negative_slope=0.2), inputs)
    for o, r in zip(ours, ref, strict=True):
        _close(o, r)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("activation", ["prelu", "relu"])
def test_batch_norm_act2d_loads_a_torch_twin_and_tracks_statistics(activation, momentum):
    torch.manual_seed(0)
    ours = BatchNormAct2d(3, momentum=momentum, activation=activation)
    twin = _twin(3, activation)
    twin.bn.momentum = momentum
    assert ours.state_dict().keys() == twin.state_dict().keys()
    with torch.no_grad():
        twin.bn.weight.uniform_(0.5, 1.5)
        twin.bn.bias.uniform_(-1, 1)
    ours.load_state_dict(twin.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(step))
        _close(ours(x), twin(x))
        _close(ours.bn.running_mean, twin.bn.running_mean)
        _close(ours.bn.running_var, twin.bn.running_var)
    assert ours.bn.num_batches_tracked.item() == 3
    ours.eval()
    twin.eval()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    _close(ours(x), twin(x))
    assert ours.bn.num_batches_tracked.item() == 3


def test_batch_norm_act2d_prelu_defaults_to_one_slope_per_channel():
    m = BatchNormAct2d(5, activation="prelu")
    assert m.act.weight.shape == (5,)
    assert torch.equal(m.act.weight, torch.full((5,), 0.25))
    assert BatchNormAct2d(5, activation="prelu", num_parameters=1).act.weight.shape == (1,)
    assert "activation='prelu'" in repr(m)
    assert "(bn): BatchNorm2d(5, eps=1e-05" in repr(m)


@pytest.mark.parametrize("use_compile", [False, True])
def test_batch_norm_act_saves_only_its_input_at_full_size(use_compile):
    # torch's BatchNorm2d + PReLU keeps x and y alive until backward (and the output z, as
    # any layer's output is). We keep x only and recompute y.
    shape = LARGE if use_compile else (2, 3, 4, 5)
    C = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    a = torch.full((C,), 0.25, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = batch_norm_act(
            x, None, None, w, b, True, activation="prelu", prelu_weight=a, use_compile=use_compile
        )
    full = [t for t in saved if t is not None and t.numel() == x.numel()]
    assert len(full) == 1
    assert full[0] is x
    z.sum().backward()
    assert x.grad.shape == x.shape


def test_batch_norm_act_graph_holds_only_our_node():
    names = {f"{fn.__name__}Backward" for fn in FUNCTIONS}
    out = BatchNormAct2d(3, activation="prelu")(torch.randn(2, 3, 2, 2, requires_grad=True))
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        seen.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions if n is not None]
    assert seen == {"BatchNormActFnBackward", "AccumulateGrad"}
    assert seen <= names | {"AccumulateGrad"}


def test_batch_norm_act_without_input_grad_still_trains_parameters():
    m = BatchNormAct2d(3, activation="prelu")
    x = torch.randn(2, 3, 4, 4)  # e.g. the first layer's input
    m(x).sum().backward()
    assert m.bn.weight.grad is not None
    assert m.act.weight.grad is not None


def test_batch_norm_act_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"batch_norm_act: expected activation in"):
        batch_norm_act(torch.zeros(2, 3, 4, 4), None, None, training=True, activation="gelu")


def test_batch_norm_act2d_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"BatchNormAct2d: expected activation in"):
        BatchNormAct2d(3, activation="tanh")


def test_batch_norm_act_rejects_missing_prelu_weight():
    with pytest.raises(ValueError, match=r"expected prelu_weight of shape \(1,\) or \(3,\)"):
        batch_norm_act(torch.zeros(2, 3, 4, 4), None, None, training=True, activation="prelu")


def test_batch_norm_act_rejects_prelu_weight_for_relu():
    with pytest.raises(ValueError, match=r"expected prelu_weight=None for activation='relu'"):
        batch_norm_act(
            torch.zeros(2, 3, 4, 4), None, None, training=True, prelu_weight=torch.ones(3)
        )


def test_batch_norm_act2d_rejects_3d_input():
    with pytest.raises(ValueError, match=r"batch_norm2d: expected x of shape \(N, C, H, W\)"):
        BatchNormAct2d(3)(torch.zeros(2, 3, 4))


def test_batch_norm_act_rejects_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match=r"batch_norm_act: expected more than 1 value"):
        batch_norm_act(torch.zeros(1, 3, 1, 1), None, None, training=True)
