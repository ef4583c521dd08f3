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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup` (make test): the SLURM tests (one node, then two), which
    mostly wait for SLURM to start jobs and notice faults, run on one worker while the rest runs in
    order on the other (each SLURM cluster is machine-wide: only one worker may use it)."""
    for item in items:
        group = "slurm" if item.path.name in ("test_launch.py", "test_nodes.py") else "suite"
        item.add_marker(pytest.mark.xdist_group(group))
