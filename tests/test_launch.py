"""The SLURM launcher and the sbatch template against a real one-node SLURM (slurm/local/start.sh):
2-task gloo jobs that train to the end, survive USR2 preemption, an external `scontrol requeue` and a
crashed rank, and configs that fail before anything is queued."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from lejepa_scale.cluster.executor import parse_time
from lejepa_scale.launch import main
from tests.helpers import DEMO, ENV, ROOT, losses, tiny_job

STEPS = 80
TINY = tiny_job(STEPS)
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "60"]


def launch(*args, check=True):
    """`python -m lejepa_scale.launch ARGS` in this process (imports once: each CLI start costs ~8 s)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            err.write(e.code if isinstance(e.code, str) else "")
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def submit(run_dir, *extra, cli=False):
    args = ["--config", DEMO, *CPU_JOB, *extra, f"run.dir={run_dir}", *TINY]
    if cli:  # the real command line, as a user types it
        command = [sys.executable, "-m", "lejepa_scale.launch", *map(str, args)]
        out = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, check=True).stdout
    else:
        out = launch(*args).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def job_state(job_id):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return re.search(r"\bJobState=(\S+)", out).group(1)


def wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_until_done(job_id, run_dir, timeout=400):
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    try:
        wait_for(lambda: job_state(job_id) in final, timeout, f"job {job_id}")
    except TimeoutError as e:
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        raise TimeoutError(f"{e}\n{show}") from e
    # two ranks' progress bars share a stream: a multi-byte character can be cut in half
    logs = "".join(p.read_text(errors="replace") for p in sorted((Path(run_dir) / "slurm").glob("*.err")))
    return job_state(job_id), logs


def known_jobs():
    """Every job id the controller knows: queued, running, and finished within MinJobAge."""
    out = subprocess.run(
        ["scontrol", "show", "jobs", "-o"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"^JobId=(\d+)", out, re.M))


def logged_steps(run_dir):
    """Steps in metrics.jsonl so far (read while the job writes it: a cut last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]


def events(run_dir, kind=None):
    lines = (Path(run_dir) / "launch.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


def assert_same_training(run_dir, reference):
    assert losses(run_dir) == losses(reference)
    ours, ref = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, reference))
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def task_pid(job_id, procid):
    """The python process of one SLURM task (found by the environment SLURM gave it)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if (
            b"submitit.core._submit" in cmdline
            and f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={procid}".encode() in environ
        ):
            return int(proc.name)
    raise LookupError(f"no task {procid} of job {job_id}")


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (CI runs as root)")
    subprocess.run(["bash", ROOT / "slurm/local/start.sh"], check=True, capture_output=True, timeout=300)
    yield
    subprocess.run(["bash", ROOT / "slurm/local/stop.sh"], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """A 2-task job that runs from start to end; the reference for every interrupted run."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(run_dir, "--network-interface", "lo", cli=True)
    state, logs = wait_until_done(job_id, run_dir)
    assert state == "COMPLETED", logs[-3000:]
    return run_dir, job_id


def test_two_task_job_trains_to_the_end(uninterrupted):
    run_dir, job_id = uninterrupted
    assert logged_steps(run_dir) == list(range(STEPS))
    assert (run_dir / "model.pt").exists()
    assert [e["event"] for e in events(run_dir)] == ["submitted", "start", "finished"]
    assert events(run_dir, "start")[0]["world_size"] == 2
    assert events(run_dir, "start")[0]["network_interface"] == "lo"  # --network-interface reached the tasks
    status = json.loads(launch("status", run_dir, "--json").stdout)
    assert status["job_id"] == job_id and status["state"] == "COMPLETED"
    assert status["checkpoint"]["step"] == STEPS
    assert status["last_logged"]["step"] == STEPS - 1
    assert "COMPLETED" in launch("status", run_dir).stdout
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob("*.err"))
    assert re.search(r"CPUs available to each process: \d+ \(rank 0\)", logs)  # what the task was given


def test_usr2_preemption_checkpoints_requeues_and_resumes(uninterrupted, tmp_path):
    job_id = submit(tmp_path)
    wait_for(lambda: len(logged_steps(tmp_path)) > 30, what="step 30")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    state, logs = wait_until_done(job_id, tmp_path)
    assert state == "COMPLETED", logs[-3000:]
    (stopped,) = events(tmp_path, "stopped")
    assert stopped["signal"] == "SIGUSR2" and 30 < stopped["step"] < STEPS
    first, second = events(tmp_path, "start")
    assert (first["resume_step"], first["restart"]) == (0, 0)
    assert (second["resume_step"], second["restart"]) == (stopped["step"], 1)  # from the USR2 checkpoint
    assert "this job is preempted" in logs and f"Requeued job {job_id}" in logs
    assert_same_training(tmp_path, uninterrupted[0])


def test_external_requeue_resumes_from_the_newest_checkpoint(uninterrupted, tmp_path):
    job_id = submit(tmp_path)
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000030").is_dir(), what="checkpoint 30")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    state, logs = wait_until_done(job_id, tmp_path)
    assert state == "COMPLETED", logs[-3000:]
    first, second = events(tmp_path, "start")
    assert second["restart"] == 1 and second["resume_step"] >= 30
    # the requeue's SIGTERM may let the trainer save one more checkpoint before SLURM kills it;
    # without it the restart begins at the newest periodic one
    stopped = events(tmp_path, "stopped")
    if stopped:
        assert stopped[0]["signal"] == "SIGTERM" and second["resume_step"] == stopped[0]["step"]
    else:
        assert second["resume_step"] % 10 == 0
    assert_same_training(tmp_path, uninterrupted[0])


def test_a_crashed_rank_is_retried_and_the_job_resumes(uninterrupted, tmp_path):
    job_id = submit(tmp_path, "--max-retries", "1")
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000030").is_dir(), what="checkpoint 30")
    os.kill(task_pid(job_id, 1), signal.SIGKILL)  # no signal handler runs: like a lost node
    state, logs = wait_until_done(job_id, tmp_path)
    assert state == "COMPLETED", logs[-3000:]
    (failure,) = events(tmp_path, "failed")
    assert failure["requeued"] and failure["retries"] == 1 and failure["reason"]
    second = events(tmp_path, "start")[1]
    assert second["resume_step"] >= 30
    assert_same_training(tmp_path, uninterrupted[0])
    assert failure["reason"] in launch("status", tmp_path).stdout


def test_a_hang_is_detected_logged_requeued_and_resumed(uninterrupted, tmp_path):
    """A frozen task (SIGSTOP: alive, silent) blocks the other in a collective; its watchdog logs
    the step and the collective, records the hang and requeues the job, which resumes exactly."""
    job_id = submit(tmp_path, "--max-retries", "1", "train.hang_timeout=8")
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000030").is_dir(), what="checkpoint 30")
    os.kill(task_pid(job_id, 1), signal.SIGSTOP)
    state, logs = wait_until_done(job_id, tmp_path)
    assert state == "COMPLETED", logs[-3000:]
    (hang,) = events(tmp_path, "hung")
    assert hang["requeued"] and "no training step completed" in hang["reason"]
    assert "waits in torch.distributed." in hang["reason"] and "last completed step:" in hang["reason"]
    assert events(tmp_path, "start")[1]["resume_step"] >= 30
    assert_same_training(tmp_path, uninterrupted[0])
    assert "no training step completed" in launch("status", tmp_path).stdout


def test_retries_are_bounded(slurm, tmp_path):
    job_id = submit(tmp_path, "--max-retries", "0")
    wait_for(lambda: len(logged_steps(tmp_path)) > 5, what="step 5")
    os.kill(task_pid(job_id, 1), signal.SIGKILL)
    state, logs = wait_until_done(job_id, tmp_path)
    assert state == "FAILED"
    (failure,) = events(tmp_path, "failed")
    assert not failure["requeued"] and "giving up: crash 1, more than --max-retries 0" in logs
    assert len(events(tmp_path, "start")) == 1


def test_config_error_fails_before_anything_is_queued(slurm, tmp_path):
    before = known_jobs()
    for typo, message in [
        ("train.stpes=3", "Did you mean: 'steps'?"),
        ("parallel.dp_replicate=3", "must divide the world size 2"),
        ("data.source=shards", "data.train"),
        (f"data.train={tmp_path}/shards", "data.source"),
    ]:
        result = launch("--config", DEMO, *CPU_JOB, f"run.dir={tmp_path}/r", typo, check=False)
        assert result.returncode != 0 and "nothing submitted" in result.stderr and message in result.stderr
    assert known_jobs() <= before  # nothing new (finished jobs may age out meanwhile)
    assert not (tmp_path / "r").exists()


def test_dry_run_for_16_nodes_prints_the_sbatch_script_without_slurm(tmp_path):
    """On a laptop or CI box without SLURM (no srun on PATH), the real command line."""
    shard = tmp_path / "train-000000.tar"
    shard.touch()
    args = [
        "--config", ROOT / "configs/vit_g14_in1k_16nodes.yaml", "--nodes", "16", "--partition", "learn",
        "--account", "ssl", "--qos", "high", "--constraint", "h100", "--exclude", "node[001-004]",
        "--time", "3-00:00:00", "--dry-run", f"run.dir={tmp_path}/run", f"data.train={shard}",
    ]  # fmt: skip
    no_slurm = {**ENV, "PATH": str(Path(sys.executable).parent)}
    command = [sys.executable, "-m", "lejepa_scale.launch", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=no_slurm, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    expected = [
        "--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=learn",
        "--account=ssl", "--qos=high", "--constraint=h100", "--exclude=node[001-004]", "--time=4320",
        "--signal=USR2@180", "--requeue", f"--output={tmp_path}/run/slurm/%j_0_log.out",
    ]  # fmt: skip
    lines = {line.replace("'", "") for line in out.splitlines() if line.startswith("#SBATCH")}
    assert {f"#SBATCH {e}" for e in expected} <= lines
    assert "srun" in out and "submitit.core._submit" in out
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in out  # srun no longer inherits it (22.05)
    assert not (tmp_path / "run").exists()


def test_local_mode_runs_the_same_job_with_torchrun(uninterrupted, tmp_path):
    args = ["--config", DEMO, "--local", "2", "--network-interface", "lo",
            f"run.dir={tmp_path}", *TINY]  # fmt: skip
    command = [sys.executable, "-m", "lejepa_scale.launch", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" in result.stdout
    assert "network interface: GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo" in result.stderr
    assert_same_training(tmp_path, uninterrupted[0])


def test_sbatch_template_trains_and_requeues_itself_on_usr2(uninterrupted, tmp_path):
    """slurm/train.sbatch: srun + torchrun; USR2 to the batch shell is forwarded to the trainers,
    which save, and the script requeues the job, which resumes and finishes."""
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--mincpus=2", f"--output={log}",
         f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable},NETWORK_INTERFACE=lo",
         ROOT / "slurm/train.sbatch",
         DEMO, f"run.dir={tmp_path}", *TINY],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip()
    wait_for(lambda: len(logged_steps(tmp_path)) > 30, what="step 30")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    wait_for(lambda: job_state(job_id) in {"COMPLETED", "FAILED", "CANCELLED"}, 400, f"job {job_id}")
    text = log.read_text(errors="replace")  # torchrun's workers share the stream: bars may interleave
    assert job_state(job_id) == "COMPLETED", text[-3000:]
    assert "USR2: the trainers checkpoint" in text and f"requeueing job {job_id}" in text
    assert [e["event"] for e in events(tmp_path)] == ["start", "stopped", "start", "finished"]
    assert "GLOO_SOCKET_IFNAME=lo" in text
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", text)
    assert resumed and 30 < int(resumed.group(1)) < STEPS
    assert_same_training(tmp_path, uninterrupted[0])


@pytest.mark.parametrize(
    "text, minutes", [("90", 90), ("72:00:00", 4320), ("3-00:00:00", 4320), ("1-12", 2160), ("10:30", 10)]
)
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes
