"""Folding BatchNorm into the preceding conv/linear keeps eval outputs unchanged."""

import torch

from facetag.models.embedder import EmbeddingNet, FaceClassifier
from facetag.models.fold import fold_batchnorm


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
    assert type(folded.embedder.stages[0].norm_act).__name__ == "PReLU"
    assert folded.embedder.stages[0].conv.bias is not None
