import os

import pytest
import torch

# Deterministic, cheap defaults for the whole suite (2-core CI machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")  # tests of wandb itself ask for offline explicitly
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
