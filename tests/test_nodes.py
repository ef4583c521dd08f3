"""Two real SLURM nodes on this machine (slurm/local/two_nodes.sh: every daemon in its own network,
UTS and mount namespaces; one task per node, HSDP with a replica per node): the job trains on both
launch paths bit for bit like `launch --local 2`, with gloo's traffic on the data network, and it
gets through a crashed node, a node rebooted behind SLURM's back, a partition, a dead data network,
a preemption and a requeue. The node-fault tests run both launch paths at once, through the same
fault (the preemption test one path at a time), and print a row per path for docs/benchmarks.md:
`pytest tests/test_nodes.py -s`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lejepa_scale.checkpointing.checkpoint import newest_step
from tests.helpers import DEMO, ENV, ROOT, losses, sample_sets, tiny_job, weights

CLUSTER = ["bash", str(ROOT / "slurm/local/two_nodes.sh")]
STEPS = 120  # ≈ 15 s on 2 cores: room for a fault after checkpoint 10
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
    """Until SLURM no longer lists the job (a squeue that fails while the controller is busy with a
    lost node counts as still listed)."""
    deadline = time.time() + timeout
    squeue = [*CLUSTER, "login", "squeue", "-h", "-j", job_id]
    while time.time() < deadline:
        listed = subprocess.run(squeue, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        time.sleep(0.5)
    state = subprocess.run([*CLUSTER, "login", "bash", "-c", f"scontrol show job {job_id}; sinfo -N -l"],
                           capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)  # fmt: skip
    raise AssertionError(f"job {job_id} still queued after {timeout} s:\n{state.stdout}{state.stderr}")


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


# -- faults: both launch paths at once, through the same fault -------------------------------------

JOB = [
    "--nodes",
    "2",
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "1",
    "--cpus-per-task",
    "1",
    "--time",
    "15",
]
SBATCH = ["sbatch", "--parsable", "--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--mincpus=1",
          "--time", "15"]  # fmt: skip


class Run:
    """One launched job and a watch on its metrics: the last logged step each time it changed, with
    the wall time (a resumed run cuts metrics.jsonl back to its resume step, then appends)."""

    def __init__(self, path: str, job_id: str, run_dir: Path):
        self.path, self.job_id, self.run_dir = path, job_id, run_dir
        self.seen: list[tuple[float, int]] = []  # (wall time, last logged step)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        metrics, last = self.run_dir / "metrics.jsonl", None
        while not self._stop.wait(0.1):
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else None
            if step is not None and (len(lines), step) != last:
                self.seen.append((time.time(), step))
                last = (len(lines), step)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "launch.jsonl").read_text().splitlines()]

    def resumed_after(self, since: float) -> tuple[float, int]:
        """For the first restart after `since`: when training was back (the resume step logged) and
        how many steps were done again."""
        start = next(e for e in self.events() if e["event"] == "start" and e["time"] > since)
        before = max(step for t, step in self.seen if t < start["time"])
        back = next(t for t, step in self.seen if t > start["time"] and step >= start["resume_step"])
        return back, before + 1 - start["resume_step"]

    def finish(self) -> None:
        wait_gone(self.job_id, timeout=420)
        self._stop.set()


@pytest.fixture
def jobs(two_nodes):
    """The test's jobs: whatever is still queued when it ends (a failed test) is cancelled."""
    ids: list[str] = []
    yield ids
    if ids:  # scancel answers non-zero for jobs already gone
        scancel = [*CLUSTER, "login", "scancel", *ids]
        subprocess.run(scancel, capture_output=True, cwd=ROOT, env=ENV, timeout=120)
        for job in ids:
            wait_gone(job, timeout=60)


def submit(two_nodes, jobs: list[str], tmp_path: Path, path: str, *overrides: str) -> Run:
    """The job from `launch --nodes 2` (path "submitit") or `sbatch slurm/train.sbatch` ("sbatch"),
    taking one CPU of each node, in `tmp_path / path`."""
    training, run_dir = [*TRAINING, *overrides], tmp_path / path
    if path == "sbatch":
        env = {"PYTHON": sys.executable, "NPROC_PER_NODE": "1", "NETWORK_INTERFACE": "ib0"}
        sbatch = [*SBATCH, f"--output={tmp_path}/sbatch-%j.out", "slurm/train.sbatch", str(DEMO)]
        job_id = two_nodes("login", *sbatch, f"run.dir={run_dir}", *training, env=env).strip()
    else:
        launch = [sys.executable, "-m", "lejepa_scale.launch", "--config", str(DEMO), *JOB]
        launch += ["--network-interface", "ib0", f"run.dir={run_dir}"]
        job_id = two_nodes("login", *launch, *training).split("submitted job ")[1].split()[0]
    jobs.append(job_id)
    return Run(path, job_id, run_dir)


def submit_both(two_nodes, jobs: list[str], tmp_path: Path, *overrides: str) -> list[Run]:
    """The same job on both launch paths at once: [submitit, sbatch]. `launch` first: the command
    itself takes seconds (17 s in one loaded CI run, while the sbatch job trained to its end)."""
    submitit = submit(two_nodes, jobs, tmp_path, "submitit", *overrides)
    return [submitit, submit(two_nodes, jobs, tmp_path, "sbatch", *overrides)]


def wait_for_checkpoint(runs: list[Run], step: int, timeout: float = 300) -> None:
    """Until each run's newest complete checkpoint is at `step` or later."""
    deadline = time.time() + timeout
    while not all(newest_step(r.run_dir) >= step for r in runs):
        assert time.time() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.2)


def together_at_checkpoint(two_nodes, runs: list[Run], step: int, timeout: float = 300) -> None:
    """Each run suspended (`scontrol suspend`) once it has checkpoint `step`, until every run has it,
    then all resumed: the two paths start training seconds apart, and a fault must find both at it."""
    deadline, waiting = time.time() + timeout, list(runs)
    while waiting:
        assert time.time() < deadline, f"no checkpoint {step} after {timeout} s: {[r.path for r in waiting]}"
        for run in [run for run in waiting if newest_step(run.run_dir) >= step]:
            two_nodes("login", "scontrol", "suspend", run.job_id)
            waiting.remove(run)
        time.sleep(0.2)
    two_nodes("login", "scontrol", "resume", ",".join(run.job_id for run in runs))
    assert all(newest_step(run.run_dir) < STEPS for run in runs)


def outcome(fault: str, run: Run, since: float, reference: Path) -> dict:
    """Check the run finished bit-identical to the reference; the fault table's row for it."""
    run.finish()
    assert_same_training(run.run_dir, reference)
    again, redone = run.resumed_after(since)
    ends = [e["event"] for e in run.events() if e["event"] not in ("submitted", "start")]
    row = {"fault": fault, "path": run.path, "training again (s)": round(again - since, 1),
           "steps redone": redone, "outcome": " → ".join(ends)}  # fmt: skip
    print(f"\nfault table: {json.dumps(row)}")
    with open(run.run_dir.parent / "fault_table.jsonl", "a") as rows:  # for docs/benchmarks.md
        rows.write(json.dumps(row) + "\n")
    return row


def test_both_launch_paths_train_on_two_nodes_like_two_local_processes(two_nodes, jobs, reference, tmp_path):
    before = {link: link_bytes("lj1", link) for link in ("eth0", "ib0")}
    submitit, sbatch = submit_both(two_nodes, jobs, tmp_path)
    for run in (submitit, sbatch):
        run.finish()
        assert_same_training(run.run_dir, reference)
    traffic = {link: link_bytes("lj1", link) - before[link] for link in ("eth0", "ib0")}
    # gloo's collectives run on the data network; eth0 carries SLURM and the rendezvous store
    assert traffic["ib0"] > 1_000_000 and traffic["ib0"] > 5 * traffic["eth0"], traffic
    assert [e["event"] for e in submitit.events()] == ["submitted", "start", "finished"]
    assert [e["event"] for e in sbatch.events()] == ["start", "finished"]
    for run in (submitit, sbatch):
        start = run.events()[-2]
        assert (start["world_size"], start["network_interface"], start["nodes"]) == (2, "ib0", "lj[1-2]")
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "submitit" / "slurm").glob("*.err"))
    assert "CPUs available to each process:" in logs  # what a task on a node was given
    log = next(tmp_path.glob("sbatch-*.out")).read_text()
    assert "2 node(s) x 1" in log and "GLOO_SOCKET_IFNAME=ib0" in log
    status = two_nodes("login", sys.executable, "-m", "lejepa_scale.launch", "status", str(sbatch.run_dir))
    assert f"job: {sbatch.job_id} COMPLETED" in status and "failures: none" in status


def through_fault(two_nodes, jobs, tmp_path, reference, name, fault, restore=None, down=0.0, *overrides,
                  freeze: str | None = None):  # fmt: skip
    """Both paths' job, the fault once both have checkpoint 10 (`restore` after `down` s), until
    both finish bit-identical: [(run, its fault-table row)]. `freeze`: a node whose tasks of the
    jobs are stopped right after the fault (see freeze_tasks)."""
    runs = submit_both(two_nodes, jobs, tmp_path, *overrides)
    together_at_checkpoint(two_nodes, runs, 10)
    started = time.time()
    two_nodes(*fault)
    if freeze:
        assert freeze_tasks(freeze, [run.job_id for run in runs]) == {run.job_id for run in runs}
    if restore:
        time.sleep(down)
        two_nodes(*restore)
    return [(run, outcome(name, run, started, reference)) for run in runs]


def freeze_tasks(node: str, job_ids: list[str]) -> set[str]:
    """SIGSTOP every task of the jobs on `node` (not SLURM's slurmstepd), as a rank blocked in the
    kernel would be: still there when the node is back, so its slurmd reports the previous start's
    step. Returns the jobs it stopped tasks of."""
    frozen, ids = set(), {f"SLURM_JOB_ID={job}".encode(): job for job in job_ids}
    pids = subprocess.run(["ip", "netns", "pids", f"lj-{node}"], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            task = Path(f"/proc/{pid}/comm").read_text().strip() != "slurmstepd"
        except OSError:  # ended meanwhile
            continue
        if task and (ours := [ids[v] for v in environ if v in ids]):
            os.kill(int(pid), signal.SIGSTOP)
            frozen.update(ours)
    return frozen


def failures(run: Run) -> list[dict]:
    return [e for e in run.events() if e["event"] in ("failed", "hung", "node failure")]


def test_a_crashed_node_back_30_s_later_is_a_node_failure_on_both_paths(two_nodes, jobs, reference, tmp_path):
    name, crash = "node crash, back after 30 s", (("crash", "lj2"), ("boot", "lj2"), 30)
    for run, _ in through_fault(two_nodes, jobs, tmp_path, reference, name, *crash):
        assert [e["event"] for e in failures(run)] == ["node failure"]  # not a crash: --max-retries unused


def test_a_node_rebooted_before_slurm_noticed_does_not_hang_the_job(two_nodes, jobs, reference, tmp_path):
    """The rebooted slurmd knows nothing of the job's step: srun would wait for it until the time
    limit. Bound: the submitit path requeues at once (the node's slurmd restarted after the job
    started), the sbatch path cancels the step 30 s after its first task ended; training again
    within 120 s."""
    name, reboot = "node crash + reboot before SLURM notices", (("crash", "lj2"), ("boot", "lj2"), 0)
    for run, row in through_fault(two_nodes, jobs, tmp_path, reference, name, *reboot):
        (failure,) = failures(run)
        assert failure["event"] == "node failure" and "slurmd restarted" in failure["nodes"]["lj2"]
        assert row["training again (s)"] < 120


def test_a_node_partitioned_for_60_s_ends_finished(two_nodes, jobs, reference, tmp_path):
    """The cut-off node's tasks are frozen, so they are still there when it is back: its slurmd
    reports the previous start's step, and SLURM kills every step of the job on that node, the new
    start's included, until none is left (a CI run: the restarted trainer on lj2 killed 0.84 s after
    its start, the one on lj1 waiting for it until the test gave up). The preflight must find that
    out before the trainers start."""
    cut = ("cut", "lj2"), ("restore", "lj2"), 60
    name = "node partitioned 60 s, its tasks frozen"
    for run, _ in through_fault(two_nodes, jobs, tmp_path, reference, name, *cut, freeze="lj2"):
        assert [e["event"] for e in failures(run)] == ["node failure"]


def test_a_dead_data_network_is_a_detected_hang_requeued_and_resumed(two_nodes, jobs, reference, tmp_path):
    name = "data network down 22 s (hang_timeout 12 s)"
    cut = ("cut-data", "lj2"), ("restore-data", "lj2"), 22
    for run, _ in through_fault(two_nodes, jobs, tmp_path, reference, name, *cut, "train.hang_timeout=12"):
        (hung,) = failures(run)
        assert hung["event"] == "hung" and hung["requeued"], hung
        where = r"last completed step: \d+; the training loop waits in torch.distributed\."
        assert re.search(where, hung["reason"])


@pytest.mark.parametrize("path", ["submitit", "sbatch"])
def test_preemption_and_requeue_save_and_resume(two_nodes, jobs, reference, tmp_path, path):
    """One path at a time: SLURM does not preempt a job it resumed within the last ~30 s, so the two
    paths cannot be aligned by suspending them (together_at_checkpoint) as the node faults are."""
    run = submit(two_nodes, jobs, tmp_path, path)
    wait_for_checkpoint([run], 10)
    preempted = time.time()
    high = ["sbatch", "-p", "high", "-N2", "--exclusive", "--output=/dev/null", "--wrap", "srun hostname"]
    two_nodes("login", *high)
    deadline = time.time() + 300
    while True:  # requeued once it trains again after the preemption: a checkpoint past its resume step
        assert time.time() < deadline, "not training again 300 s after the preemption"
        starts = [e for e in run.events() if e["event"] == "start" and e["time"] > preempted]
        if starts and newest_step(run.run_dir) > starts[0]["resume_step"]:
            break
        time.sleep(0.2)
    requeued = time.time()
    two_nodes("login", "scontrol", "requeue", run.job_id)
    faults = [("preemption (high partition)", preempted), ("scontrol requeue", requeued)]
    rows = [outcome(fault, run, since, reference) for fault, since in faults]
    assert all(row["steps redone"] <= 10 for row in rows), rows  # at most back to the last periodic save
    assert rows[-1]["outcome"] == "stopped → stopped → finished" and failures(run) == []


def test_status_shows_a_job_slurm_ended_with_its_reason_and_how_to_resume(two_nodes, jobs, tmp_path):
    launch = [sys.executable, "-m", "lejepa_scale.launch", "--config", str(DEMO), *JOB]
    out = two_nodes("login", *launch, f"run.dir={tmp_path}", *TRAINING)
    job_id = out.split("submitted job ")[1].split()[0]
    jobs.append(job_id)
    run = Run("submitit", job_id, tmp_path)
    wait_for_checkpoint([run], 10)
    two_nodes("login", "scancel", "--batch", "--signal=KILL", job_id)  # the batch step dies outside Python
    run.finish()
    status = two_nodes("login", sys.executable, "-m", "lejepa_scale.launch", "status", str(tmp_path))
    assert re.search(rf"job: {job_id} FAILED \(.*ExitCode 0:9", status), status
    assert "SLURM ended the job (FAILED) before training finished" in status
    assert re.search(
        r"to resume: python -m lejepa_scale.launch --config \S+ --nodes 2 .* \(continues from step", status
    )


def test_a_job_of_1_to_2_nodes_continues_on_the_node_left_with_the_same_samples(two_nodes, jobs, tmp_path):
    """`launch --nodes 1-2` starts on both nodes; with one node drained and the job requeued, SLURM
    restarts it on the node left, where it resumes at world size 1 (two micro-batches where each
    rank took one) and trains on exactly the samples of an uninterrupted run, step by step."""
    training = [*tiny_job(40), "log.wandb=disabled", "train.global_batch_size=32", "log.sample_keys=true"]
    local = [sys.executable, "-m", "lejepa_scale.launch", "--config", str(DEMO), "--local", "1"]
    local += [f"run.dir={tmp_path / 'local'}", *training]
    subprocess.run(local, capture_output=True, env=ENV, cwd=ROOT, check=True, timeout=600)
    launch = [sys.executable, "-m", "lejepa_scale.launch", "--config", str(DEMO), *JOB]
    launch[launch.index("--nodes") + 1] = "1-2"
    out = two_nodes("login", *launch, "--network-interface", "ib0", f"run.dir={tmp_path / 'job'}", *training)
    jobs.append(job_id := out.split("submitted job ")[1].split()[0])
    run = Run("submitit", job_id, tmp_path / "job")
    wait_for_checkpoint([run], 10)
    two_nodes("login", "scontrol", "update", "nodename=lj2", "state=drain", "reason=elastic-test")
    try:
        two_nodes("login", "scontrol", "requeue", job_id)
        run.finish()
    finally:
        two_nodes("login", "scontrol", "update", "nodename=lj2", "state=resume")
    starts = [e for e in run.events() if e["event"] == "start"]
    assert (starts[0]["num_nodes"], starts[0]["world_size"]) == (2, 2)
    assert (starts[-1]["num_nodes"], starts[-1]["world_size"]) == (1, 1) and starts[-1]["resume_step"] >= 10
    assert sample_sets(run.run_dir) == sample_sets(tmp_path / "local") and len(sample_sets(run.run_dir)) == 40
    status = two_nodes("login", sys.executable, "-m", "lejepa_scale.launch", "status", str(run.run_dir))
    assert "2 node(s), world 2, from step 0" in status and "1 node(s), world 1, from step" in status
