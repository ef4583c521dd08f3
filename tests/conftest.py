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


SLURM_MODULES = ("test_nodes.py", "test_launch.py")  # the two-node cluster's, the one-node cluster's


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (make test): each SLURM cluster's
    tests (two nodes, then one node), which mostly wait for SLURM to start jobs and notice faults, go
    first as one unit each, so the two start at once on the two workers (each cluster is machine-wide:
    one worker at a time may use it); every other module is a unit of its own (its module fixtures
    built once), taken by whichever worker is free."""

    def unit(item) -> int:
        name = item.path.name
        return SLURM_MODULES.index(name) if name in SLURM_MODULES else len(SLURM_MODULES)

    items.sort(key=unit)  # stable: the rest as collected
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.path.name))
