"""dlib's face ResNet on our layers: topology facts, shapes, no autograd leak, folding."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facetag import layers
from facetag.models.fold import ConvPoolAct
from facetag.models.resnet import (
    DLIB_MEAN_RGB,
    ConvAffine,
    DlibResNet,
    conv_layers,
    count_macs,
)
from tests.helpers import leaked_nodes


def _randomised(seed: int = 0, channels_last: bool = False) -> DlibResNet:
    """A net whose affines are not the identity (folding them must then do something)."""
    torch.manual_seed(seed)
    net = DlibResNet(channels_last=channels_last)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConvAffine):
                m.affine.gamma.uniform_(0.5, 1.5)
                m.affine.beta.normal_(0.0, 0.1)
    return net.eval()


def _chips(N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, 3, 150, 150), generator=g, dtype=torch.uint8)


def test_resnet_topology_matches_dlib():
    net = DlibResNet()
    convs = conv_layers(net)
    assert len(convs) == 29
    assert sum(p.numel() for p in net.parameters()) == 5_614_592  # dlib's file holds as many
    assert count_macs(net) == 270_854_144  # 0.27 GMAC per chip
    assert [c.stride for c in convs].count((2, 2)) == 5  # the stem and 4 down blocks
    assert all(c.padding == (0, 0) for c in convs if c.stride == (2, 2))


def test_resnet_stage_sizes():
    net = DlibResNet().eval()
    sizes = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape))) for b in net.blocks
    ]
    with torch.no_grad():
        out = net(_chips(2))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 128)
    assert sizes == [(2, 32, 35, 35)] * 3 + [(2, 64, 17, 17)] * 4 + [(2, 128, 8, 8)] * 3 + [
        (2, 256, 4, 4)
    ] * 3 + [(2, 256, 2, 2)]


def test_resnet_embed_is_unit_length():
    net = _randomised()
    with torch.no_grad():
        emb = net.embed(_chips(3))
    assert emb.shape == (3, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_resnet_input_is_dlibs_normalisation_bit_for_bit():
    chips = _chips(2)
    x = DlibResNet().normalize(chips)
    # dlib's input_rgb_image_sized: (pixel - avg) / 256.0 with float avg, stored as float.
    mean = np.array(DLIB_MEAN_RGB, np.float32)[None, :, None, None]
    expected = (chips.numpy().astype(np.float32) - mean) / np.float32(256.0)
    assert np.array_equal(x.numpy(), expected)


def test_resnet_accepts_float_chips_like_uint8():
    net, chips = _randomised(), _chips(2)
    with torch.no_grad():
        torch.testing.assert_close(net(chips.float()), net(chips), rtol=0, atol=0)


def test_resnet_graph_has_only_our_functions():
    net = _randomised().train()
    out = net.embed(_chips(2))  # the descriptor, then our L2 normalisation
    leaked = leaked_nodes(out)
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    missing = [
        n for n, p in net.named_parameters() if p.grad is None or not p.grad.isfinite().all()
    ]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_folded_matches_unfolded(channels_last):
    net, chips = _randomised(), _chips(3)
    folded = net.folded(channels_last=channels_last)
    assert not any(isinstance(m, layers.ChannelAffine) for m in folded.modules())
    assert any(isinstance(m, layers.ChannelAffine) for m in net.modules())  # untouched
    with torch.no_grad():
        expected = net(chips)
        got = folded(chips)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len(list(folded.parameters())) == 29 * 2 + 1  # conv weight and bias, fc weight
    assert isinstance(folded.stem, ConvPoolAct)  # stem conv -> pool -> relu


def test_resnet_channels_last_matches_contiguous():
    net, chips = _randomised(), _chips(2)
    cl = _randomised(channels_last=True)
    layouts = []
    cl.blocks[0].register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        torch.testing.assert_close(cl(chips), net(chips), rtol=1e-4, atol=1e-5)
    assert layouts == [True]  # the weights' layout carries the activations' after the stem


def test_resnet_rejects_chips_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"DlibResNet: expected chips of shape \(N, 3, 150, 150\)"):
        DlibResNet()(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


@pytest.mark.slow  # ~60 steps of ~1.3 s on 2 CPU cores
def test_resnet_overfits_one_batch():
    torch.manual_seed(0)
    net = DlibResNet().train()
    head = layers.Linear(128, 8)
    # Smooth chips, one random 4x4 colour pattern each: iid pixel noise would average out
    # in the pools, leaving 8 near-identical descriptors at the default initialisation.
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(8, 3, 4, 4, generator=g)
    chips = (F.interpolate(pattern, size=(150, 150), mode="bilinear") * 255).round()
    y = torch.arange(8)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        loss = layers.cross_entropy(head(net(chips)), y)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, loss.item()
