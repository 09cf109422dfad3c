"""Model files round-trip: load_embedder rebuilds the network the config describes."""

import dataclasses

import pytest
import torch

from facetag.checkpoint import save_checkpoint
from facetag.config import Config, DataConfig, ModelConfig
from facetag.models.io import load_embedder
from facetag.training.loop import build_classifier, model_file_state


@pytest.mark.parametrize("pool", ["gap", "flatten"])
def test_load_embedder_rebuilds_the_trained_network(tmp_path, pool):
    config = Config(
        data=DataConfig(image_size=(40, 32)),
        model=dataclasses.replace(ModelConfig(), widths=(4, 8), embedding_dim=8, pool=pool),
    )
    torch.manual_seed(0)
    model = build_classifier(config, num_classes=3, in_channels=1).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model_file_state(model, config, ("a", "b", "c"), 1))
    loaded = load_embedder(path)
    x = torch.randn(2, 1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net.embed(x), model.embedder.embed(x))
    assert loaded.image_size == (40, 32)
    assert loaded.people == ["a", "b", "c"]


def test_flip_average_embeds_a_face_and_its_mirror_alike(tmp_path):
    config = Config(
        data=DataConfig(image_size=(16, 16), channels=3),
        model=dataclasses.replace(
            ModelConfig(), widths=(4, 8, 8, 8), embedding_dim=8, flip_average=True
        ),
    )
    torch.manual_seed(0)
    model = build_classifier(config, num_classes=2, in_channels=3).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model_file_state(model, config, ("a", "b"), 3))
    net = load_embedder(path).net
    assert net.flip_average
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        both = net.embed(x)
        torch.testing.assert_close(both, net.embed(x.flip(-1)))  # mirror: the same embedding
        z = net(x) + net(x.flip(-1))
        torch.testing.assert_close(both, z / z.norm(dim=1, keepdim=True))
        net.flip_average = False
        assert not torch.allclose(net.embed(x), net.embed(x.flip(-1)))
