"""Test-suite settings shared by every test."""

import pytest
import torch

# pytest runs with xdist (-n 2 in `make test`): one torch thread per worker uses the two
# cores without oversubscribing them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Manifests of runs without an output folder go to the user's cache: a test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
