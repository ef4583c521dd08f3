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
# The other modules that took more than a minute in a fresh-clone `bash .ci/run` (2 cores), heaviest
# first: started early, they do not leave one worker finishing alone at the end.
LONG_MODULES = ("test_checkpoint.py", "test_device_rules.py", "test_elastic.py", "test_evaluate.py",
                "test_step_efficiency.py", "test_parallel.py", "test_watchdog.py", "test_recipes.py",
                "test_demo.py", "test_swa.py")  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (make test): each SLURM cluster's
    tests (two nodes, then one node), which mostly wait for SLURM to start jobs and notice faults, go
    first as one unit each, so the two start at once on the two workers (each cluster is machine-wide:
    one worker at a time may use it); every other module is a unit of its own (its module fixtures
    built once), taken by whichever worker is free, the long ones first."""
    order = SLURM_MODULES + LONG_MODULES

    def unit(item) -> int:
        name = item.path.name
        return order.index(name) if name in order else len(order)

    items.sort(key=unit)  # stable: the rest as collected
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.path.name))
