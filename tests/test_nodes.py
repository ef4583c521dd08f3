"""Two real SLURM nodes on this machine (slurm/local/two_nodes.sh: every daemon in its own network,
UTS and mount namespaces; one task per node, HSDP with a replica per node): the job trains on both
launch paths bit for bit like `launch --local 2`, with gloo's traffic on the data network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import DEMO, ENV, ROOT, losses, tiny_job, weights

CLUSTER = ["bash", str(ROOT / "slurm/local/two_nodes.sh")]
STEPS = 40
TRAINING = [*tiny_job(STEPS), "parallel.dp_replicate=2", "log.wandb=disabled"]


def cluster(*args: str, env: dict | None = None) -> str:
    """A two_nodes.sh command (`login CMD...` runs CMD on the login node); its stdout."""
    result = subprocess.run(
        [*CLUSTER, *args], capture_output=True, text=True, cwd=ROOT, env={**ENV, **(env or {})}, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="session")
def two_nodes():
    if os.geteuid() != 0:
        pytest.skip("the two-node SLURM cluster needs root (CI runs as root)")
    cluster("start")
    yield cluster
    cluster("stop")
    assert not any(name.startswith("lj-") for name in cluster_namespaces())


def cluster_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_gone(job_id: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while cluster("login", "squeue", "-h", "-j", job_id).strip() and time.time() < deadline:
        time.sleep(0.5)
    assert time.time() < deadline, f"job {job_id} still queued after {timeout} s"


def link_bytes(node: str, link: str) -> int:
    (stats,) = json.loads(
        subprocess.run(
            ["ip", "-n", f"lj-{node}", "-s", "-j", "link", "show", link],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return stats["stats64"]["rx"]["bytes"] + stats["stats64"]["tx"]["bytes"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same training as 2 local processes (`launch --local 2`): what both nodes must reproduce."""
    run_dir = tmp_path_factory.mktemp("local2")
    command = [
        sys.executable,
        "-m",
        "lejepa_scale.launch",
        "--config",
        str(DEMO),
        "--local",
        "2",
        f"run.dir={run_dir}",
        *TRAINING,
    ]
    subprocess.run(command, capture_output=True, env=ENV, cwd=ROOT, check=True, timeout=600)
    return run_dir


def assert_same_training(run_dir: Path, reference: Path) -> None:
    assert losses(run_dir) == losses(reference) and len(losses(run_dir)) == STEPS
    ours, theirs = weights(run_dir), weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_launch_trains_on_two_nodes_like_two_local_processes(two_nodes, reference, tmp_path):
    before = {link: link_bytes("lj1", link) for link in ("eth0", "ib0")}
    job = [
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
    ]
    launch = [sys.executable, "-m", "lejepa_scale.launch", "--config", str(DEMO), *job, "--time", "10"]
    out = two_nodes("login", *launch, "--network-interface", "ib0", f"run.dir={tmp_path}", *TRAINING)
    job_id = out.split("submitted job ")[1].split()[0]
    wait_gone(job_id)
    traffic = {link: link_bytes("lj1", link) - before[link] for link in ("eth0", "ib0")}
    events = [json.loads(line) for line in (tmp_path / "launch.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["submitted", "start", "finished"], events
    assert events[1]["world_size"] == 2 and events[1]["network_interface"] == "ib0"
    assert_same_training(tmp_path, reference)
    # gloo's collectives run on the data network; eth0 carries SLURM and the rendezvous store
    assert traffic["ib0"] > 1_000_000 and traffic["ib0"] > 5 * traffic["eth0"], traffic
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "slurm").glob("*.err"))
    assert "CPUs available to each process:" in logs  # what a task on a node was given


def test_the_sbatch_template_trains_on_two_nodes_like_two_local_processes(two_nodes, reference, tmp_path):
    env = {"PYTHON": sys.executable, "NPROC_PER_NODE": "1", "NETWORK_INTERFACE": "ib0"}
    sbatch = [
        "sbatch",
        "--parsable",
        "--nodes",
        "2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time",
        "10",
        f"--output={tmp_path}/sbatch-%j.out",
    ]
    job_id = two_nodes(
        "login", *sbatch, "slurm/train.sbatch", str(DEMO), f"run.dir={tmp_path}", *TRAINING, env=env
    )
    job_id = job_id.strip()
    wait_gone(job_id)
    assert_same_training(tmp_path, reference)
    log = next(tmp_path.glob("sbatch-*.out")).read_text()
    assert "2 node(s) x 1" in log and "GLOO_SOCKET_IFNAME=ib0" in log
