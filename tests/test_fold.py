"""Inference copies (BatchNorm folded, max pools before monotone activations) keep eval
outputs unchanged."""

import pytest
import torch

from facetag.models import fold
from facetag.models.embedder import EmbeddingNet, FaceClassifier
from facetag.models.fold import ConvPoolAct, conv_pool_act, fold_batchnorm, nondecreasing


def test_fold_batchnorm_matches_eval_model_and_leaves_it_unchanged():
    torch.manual_seed(0)
    model = FaceClassifier(EmbeddingNet(3, widths=(8, 16), embedding_dim=8), 5)
    x = torch.randn(6, 3, 16, 16)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # give the running statistics non-trivial values
            model(x * 2 + 1)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
        again = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected)  # the original is not modified
    # conv -> PReLU (slopes 0.25) -> pool became conv -> pool -> PReLU
    assert type(folded.embedder.stages[0]).__name__ == "ConvPoolAct"
    assert type(folded.embedder.stages[0].act).__name__ == "PReLU"
    assert folded.embedder.stages[0].conv.bias is not None


def _block(slopes: torch.Tensor, ceil_mode: bool = False, K: int = 2, S: int = 2):
    from facetag import layers

    torch.manual_seed(1)
    conv = layers.Conv2d(3, slopes.numel(), 3, padding=1)
    act = layers.PReLU(slopes.numel())
    with torch.no_grad():
        act.weight.copy_(slopes)
    return conv, act, layers.MaxPool2d(K, S, ceil_mode=ceil_mode)


@pytest.mark.parametrize(("K", "S", "ceil_mode"), [(2, 2, False), (2, 2, True), (3, 2, True)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_pool_act_matches_act_then_pool_in_blocks(monkeypatch, K, S, ceil_mode, memory_format):
    conv, act, pool = _block(torch.tensor([0.0, 0.1, 0.25, 1.0]), ceil_mode, K, S)
    conv = conv.to(memory_format=memory_format)
    x = torch.randn(7, 3, 11, 9).contiguous(memory_format=memory_format)
    x_before = x.clone()
    with torch.no_grad():
        expected = pool(act(conv(x)))
        fused = conv_pool_act(conv, act, pool)
        assert fused is not None
        # 3 images of conv output per block: blocks of 3, 3 and 1 images
        monkeypatch.setattr(fold, "BLOCK_BYTES", 3 * 4 * 11 * 9 * 4)
        got = fused(x)
    torch.testing.assert_close(got, expected)  # a conv over fewer images rounds apart
    assert got.is_contiguous(memory_format=memory_format)
    assert torch.equal(x, x_before)  # only the conv's own output is written over


def test_conv_pool_act_keeps_gradients_when_training():
    conv, act, pool = _block(torch.tensor([0.1, 0.3]))
    fused = conv_pool_act(conv, act, pool)
    assert fused is not None
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    fused(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    pool(act(conv(x))).sum().backward()
    torch.testing.assert_close(got, x.grad)


def test_conv_pool_act_refuses_a_decreasing_activation():
    conv, act, pool = _block(torch.tensor([0.2, -0.1]))  # one slope < 0: not monotone
    assert not nondecreasing(act)
    assert conv_pool_act(conv, act, pool) is None
    with pytest.raises(ValueError, match="ConvPoolAct: expected a non-decreasing activation"):
        ConvPoolAct(conv, pool, act)
