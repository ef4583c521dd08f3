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


SLURM_MODULES = ("test_launch.py", "test_nodes.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (make test): the SLURM tests (one
    node, then two), which mostly wait for SLURM to start jobs and notice faults, go first as one
    unit to one worker (each SLURM cluster is machine-wide: only one worker may use it); every other
    module is a unit of its own (its module fixtures built once), taken by whichever worker is free."""
    items.sort(key=lambda item: item.path.name not in SLURM_MODULES)  # stable: SLURM first, else as collected
    for item in items:
        group = "slurm" if item.path.name in SLURM_MODULES else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
