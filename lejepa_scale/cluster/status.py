"""`python -m lejepa_scale.launch status RUN_DIR`: what happened to a run, read from its
`launch.jsonl`, its checkpoints, its metrics and SLURM's word on its job."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from lejepa_scale.checkpointing.checkpoint import checkpoint_step, complete_checkpoints
from lejepa_scale.cluster.attempts import read_events, scontrol

FAILURES = ("failed", "hung", "node failure")
ENDED_BY_SLURM = ("FAILED", "NODE_FAIL", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_state(job_id: str) -> dict[str, str]:
    """SLURM's word on a job (JobState, Reason, ExitCode): scontrol while the controller knows it,
    else sacct."""
    (job,) = scontrol("job", job_id) or [{}]
    if "JobState" in job:
        return {k: job[k] for k in ("JobState", "Reason", "ExitCode") if k in job}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id],
                         capture_output=True, text=True)  # fmt: skip
    rows = [
        line.split("|") for line in out.stdout.splitlines() if "|" in line and not line.startswith("State")
    ]
    if out.returncode == 0 and rows:
        return {"JobState": rows[-1][0], "ExitCode": rows[-1][-1]}
    return {"JobState": "UNKNOWN (no longer known to SLURM)"}


def run_status(run_dir: Path) -> dict:
    events = read_events(run_dir)
    submitted = [e for e in events if e["event"] == "submitted"]
    started = [e for e in events if e["event"] == "start" and e.get("job_id")]  # sbatch jobs: no "submitted"
    job_id = submitted[-1]["job_id"] if submitted else started[-1]["job_id"] if started else None
    done = complete_checkpoints(run_dir / "checkpoints")
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    last = json.loads(lines[-1]) if lines else None
    ours = [e for e in events if e.get("job_id") == job_id and ("local" in e) == (job_id is None)]
    local = [e["local"] for e in ours if e["event"] == "start" and "local" in e]
    slurm = job_state(job_id) if job_id and shutil.which("scontrol") else {}
    state = slurm.get("JobState")
    ended_by_slurm = state in ENDED_BY_SLURM and not any(e["event"] == "finished" for e in ours)
    return {
        "run_dir": str(run_dir),
        "job_id": job_id,
        "local": local[-1] if local else None,
        "state": state,
        "slurm": slurm,
        "starts": sum(e["event"] == "start" for e in ours),
        "attempts": [
            {
                "nodes": e.get("num_nodes"),
                "world_size": e.get("world_size"),
                "resume_step": e.get("resume_step"),
            }
            for e in ours
            if e["event"] == "start"
        ],
        "failures": [f"{e['event']}: {e['reason']}" for e in ours if e["event"] in FAILURES],
        "node_failures": sum(e["event"] == "node failure" for e in ours),
        "checkpoint": {"path": str(done[-1]), "step": checkpoint_step(done[-1])} if done else None,
        "last_logged": {k: last[k] for k in ("step", "loss") if k in last} if last else None,
        "resume_with": submitted[-1].get("command") if ended_by_slurm and submitted else None,
    }


def print_status(status: dict) -> None:
    ckpt, last, slurm = status["checkpoint"], status["last_logged"], status["slurm"]
    said = ", ".join(f"{k} {v}" for k, v in slurm.items() if k != "JobState" and v not in ("None", "(null)"))
    rows = [
        ("run dir", status["run_dir"]),
        (
            "job",
            f"{status['job_id']} {status['state'] or ''}{f' ({said})' if said else ''}"
            if status["job_id"]
            else f"local run (--local {status['local']}), not submitted"
            if status["local"]
            else "never run",
        ),
        ("starts", f"{status['starts']} (1 + requeues; {status['node_failures']} after node failures)"),
        (
            "attempts",
            "; ".join(
                f"{a['nodes']} node(s), world {a['world_size']}, from step {a['resume_step']}"
                for a in status["attempts"]
                if a["nodes"] is not None
            )
            or "–",
        ),
        ("failures", "; ".join(status["failures"]) or "none"),
        ("checkpoint", f"step {ckpt['step']} ({ckpt['path']})" if ckpt else "none complete"),
        (
            "last logged",
            f"step {last['step']}, loss {last.get('loss', float('nan')):.4f}" if last else "nothing",
        ),
    ]
    if status["resume_with"]:
        step = ckpt["step"] if ckpt else 0
        rows.append(("ended", f"SLURM ended the job ({status['state']}) before training finished"))
        rows.append(("to resume", f"{status['resume_with']}   (continues from step {step})"))
    for name, value in rows:
        print(f"{name:>12}: {value}")
