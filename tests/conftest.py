"""Test-suite settings shared by every test."""

import torch

# pytest runs with xdist (-n 2 in `make test`): one torch thread per worker uses the two
# cores without oversubscribing them.
torch.set_num_threads(1)
