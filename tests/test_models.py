"""Model-level proofs: no built-in autograd node leaks in, a batch overfits, shapes hold."""

import torch

from facetag import layers
from facetag.models.embedder import EmbeddingNet, FaceClassifier
from tests.helpers import leaked_nodes


def _model(head: str = "softmax", in_channels: int = 1, P: int = 5) -> FaceClassifier:
    torch.manual_seed(0)
    embedder = EmbeddingNet(in_channels, widths=(8, 16, 16, 32), embedding_dim=16, dropout=0.1)
    return FaceClassifier(embedder, P, head=head)


def test_classifier_graph_has_only_our_functions():
    model = _model()
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    loss = layers.cross_entropy(model(x), y, label_smoothing=0.1)
    leaked = leaked_nodes(loss)
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"


def test_arcface_graph_and_embedding_have_only_our_functions():
    model = _model(head="arcface")
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    loss = layers.cross_entropy(model(x, y), y)
    emb = model.embedder.embed(x)
    leaked = leaked_nodes(loss, emb)
    assert not leaked, f"built-in autograd nodes in the graph: {sorted(leaked)}"


def test_classifier_overfits_one_batch():
    model = _model(in_channels=3, P=8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        opt.zero_grad()
        loss = layers.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_classifier_output_shapes():
    model = _model(in_channels=3, P=7).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        emb = model.embedder.embed(x)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_training_layout_is_channels_last_on_the_cpu_only():
    from facetag.models.embedder import EmbeddingNet, training_layout

    net = training_layout(EmbeddingNet(3, widths=(8, 16, 16, 16)), "cpu")
    conv = net.stages[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    y = net.stages[0](torch.randn(2, 3, 16, 16))  # an (N, C, H, W) batch as loaders give it
    assert y.is_contiguous(memory_format=torch.channels_last)
    other = EmbeddingNet(3, widths=(8, 16, 16, 16))
    assert training_layout(other, "cuda") is other  # left as it is off the CPU
    assert other.stages[0].conv.weight.is_contiguous()
