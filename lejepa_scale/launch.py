"""`python -m lejepa_scale.launch --config FILE --nodes 16 [key=value ...]`: train on SLURM with submitit.

The config is resolved and checked here, before anything is queued. Every SLURM task (one per GPU)
joins the process group from SLURM's environment and runs `train`. Preemption and the time limit
(SLURM sends USR2 `--signal-delay` seconds ahead) save a checkpoint through the trainer's signal path
and requeue the job; an external `scontrol requeue` or a node failure restarts it from the newest
complete checkpoint; a crash is requeued up to `--max-retries` times. What happened is appended to
`<run.dir>/launch.jsonl`, which `python -m lejepa_scale.launch status RUN_DIR` summarises.

`--local N` runs the same config with N processes on this machine (torchrun), for development.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import submitit
import torch
import torch.distributed as dist

from data_pipeline.builtin import BUILTIN
from data_pipeline.shards import shard_paths
from lejepa_scale.checkpointing.checkpoint import newest_step, resolve_checkpoint
from lejepa_scale.cluster.attempts import Attempt, Limits, lost_peer, record
from lejepa_scale.cluster.executor import network_environment, node_range, sbatch_script, slurm_executor
from lejepa_scale.cluster.preemption import EXIT_PREEMPTED, Preempted
from lejepa_scale.cluster.status import print_status, run_status
from lejepa_scale.config import Config, ConfigError, batches, from_yaml, load_config, to_yaml
from lejepa_scale.logging_setup import configure_logging
from lejepa_scale.training.build import check_model

log = logging.getLogger("lejepa_scale.launch")

# -- the job every task runs -------------------------------------------------------------------------


class TrainJob(submitit.helpers.Checkpointable):
    """One SLURM task: join the process group, train, and leave the job in a state SLURM can resume.

    submitit pickles this object and calls it in every task. On the preemption signal (USR2) the
    trainer saves at the next step boundary; then submitit's own handler (kept from before the
    trainer took the signal over) re-pickles the job through `checkpoint()` and requeues it. Nothing
    needs to travel in the pickle: the resumed job reads the newest complete checkpoint."""

    def __init__(self, config_yaml: str, limits: Limits):
        self.config_yaml = config_yaml
        self.limits = limits

    def __call__(self) -> str:
        from lejepa_scale.train import train  # the heavy imports happen in the job, not at submission

        configure_logging()
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = from_yaml(self.config_yaml)
        attempt = Attempt.from_env(Path(cfg.run.dir), submitit.JobEnvironment().job_id)
        if env.rank == 0:
            attempt.begin(world_size=env.world_size, resume_step=newest_step(attempt.run_dir),
                          nodes=os.environ.get("SLURM_JOB_NODELIST"),
                          network_interface=os.environ.get("GLOO_SOCKET_IFNAME"))  # fmt: skip
        if attempt.out_of_node_failures(self.limits):
            sys.exit(1)
        requeue = signal.getsignal(submitit.JobEnvironment._usr_sig())  # submitit's checkpoint + requeue
        try:
            train(cfg, on_hang=lambda reason: attempt.failed(reason, False, self.limits, event="hung"))
        except Preempted as stop:
            if env.rank == 0:
                attempt.record(
                    "stopped", signal=signal.Signals(stop.signum).name, step=newest_step(attempt.run_dir)
                )
            if stop.signum == submitit.JobEnvironment._usr_sig() and callable(requeue):
                requeue(stop.signum, None)  # rank 0 requeues and exits; the others return here
            sys.exit(EXIT_PREEMPTED)  # SIGTERM: scancel or an external requeue; SLURM decides what's next
        except Exception as error:
            reason = "".join(traceback.format_exception_only(error)).strip()
            log.error("rank %d: %s", env.rank, traceback.format_exc())
            attempt.failed(reason, lost_peer(error), self.limits)
            sys.exit(1)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if env.rank == 0:
            attempt.record("finished", step=cfg.train.steps)
        return str(attempt.run_dir)


# -- submission --------------------------------------------------------------------------------------


def check_world(cfg: Config, world_size: int) -> None:
    """What a world size must allow: HSDP's replicas and the global batch divide it."""
    if world_size % cfg.parallel.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate={cfg.parallel.dp_replicate} must divide the world size {world_size} "
            "(nodes x tasks per node); set it to the number of nodes for HSDP"
        )
    batches(cfg, world_size)


def check_launchable(
    cfg: Config, world_sizes: list[int], gpus_per_node: int, tasks_per_node: int = 1
) -> None:
    """What load_config cannot know: the world sizes the job may get, the model timm builds, the
    device. With several (--nodes MIN-MAX), the node counts that cannot run are named."""
    if len(world_sizes) == 1:
        check_world(cfg, world_sizes[0])
    else:
        refused = {}
        for world in world_sizes:
            try:
                check_world(cfg, world)
            except ConfigError as e:
                refused[world] = str(e)
        if refused:
            nodes = {w: w // tasks_per_node for w in world_sizes}
            fine = [str(nodes[w]) for w in world_sizes if w not in refused]
            bad, why = ", ".join(str(nodes[w]) for w in refused), next(iter(refused.values()))
            raise ConfigError(
                f"--nodes {nodes[world_sizes[0]]}-{nodes[world_sizes[-1]]}: {bad} node(s) cannot run "
                f"({why}); the node counts that can: {', '.join(fine) or 'none'}"
            )
    check_model(cfg)
    if gpus_per_node == 0 and cfg.train.device == "cuda":
        raise ConfigError("train.device=cuda but the job requests no GPUs (--gpus-per-node 0)")


def missing_inputs(cfg: Config) -> list[str]:
    """The files the job will read that are not there (shards, data root, checkpoint.load_from),
    one line each: an error before submitting, a warning beside a dry run."""
    problems = []
    sets = [("data.train", cfg.data.train)] if cfg.data.source == "shards" and cfg.data.train else []
    sets += [(f"data.mixture[{i}]", m["train"]) for i, m in enumerate(cfg.data.mixture or [])]
    for key, spec in sets:
        if isinstance(spec, str) and spec in BUILTIN:
            continue
        try:
            shard_paths(spec)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{key}: {e}")
    if cfg.data.source != "shards" and cfg.data.root is not None and not Path(cfg.data.root).is_dir():
        problems.append(f"data.root {cfg.data.root} is not a directory")
    if cfg.checkpoint.load_from:
        try:
            resolve_checkpoint(cfg.checkpoint.load_from)
        except Exception as e:
            problems.append(f"checkpoint.load_from: {e}")
    return problems


def run_local(args: argparse.Namespace, cfg: Config, run_dir: Path) -> int:
    """`--local N`: the same resolved config under torchrun on this machine, in the foreground,
    recorded in launch.jsonl like a SLURM job (start with the resume step, then its end)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    command = [sys.executable, "-m", "lejepa_scale.train", "--config", str(config_path)]
    if args.local > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.local)]
        command = [sys.executable, *launcher, *command[1:]]
    print(f"run dir: {run_dir}\nrunning: {' '.join(command)}", flush=True)
    record(run_dir, "start", local=args.local, world_size=args.local, resume_step=newest_step(run_dir))
    code = subprocess.call(command, env={**os.environ, **network_environment(args.network_interface)})
    if code == 0:
        record(run_dir, "finished", local=args.local, step=cfg.train.steps)
    else:
        record(run_dir, "failed", local=args.local, reason=f"exit code {code}", requeued=False)
    return code


def submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.run.dir = str(Path(cfg.run.dir).resolve())  # the job may start in another directory
    run_dir = Path(cfg.run.dir)
    if args.local:
        check_launchable(cfg, [args.local], gpus_per_node=torch.cuda.device_count())
    else:
        args.tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
        low, high = node_range(args.nodes)
        world_sizes = [n * args.tasks_per_node for n in range(low, high + 1)]
        check_launchable(cfg, world_sizes, args.gpus_per_node, args.tasks_per_node)
    missing = missing_inputs(cfg)
    if args.dry_run:  # the script, and what a real submission would refuse
        print(sbatch_script(args, cfg, run_dir / "slurm"), end="")
        for line in missing:
            print(f"dry run: a submission would stop here: {line}", file=sys.stderr)
        return 0
    if missing:
        raise ConfigError("; ".join(missing))
    if args.local:
        return run_local(args, cfg, run_dir)
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run this on a SLURM login node, or use --local N / --dry-run")
    run_dir.mkdir(parents=True, exist_ok=True)
    job = slurm_executor(args, cfg, run_dir / "slurm").submit(
        TrainJob(to_yaml(cfg), Limits(args.max_retries, args.max_node_failures))
    )
    record(run_dir, "submitted", job_id=job.job_id, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
           gpus_per_node=args.gpus_per_node, max_retries=args.max_retries,
           max_node_failures=args.max_node_failures,
           command=shlex.join(["python", "-m", "lejepa_scale.launch", *args.argv]))  # fmt: skip
    print(
        f"submitted job {job.job_id}\n"
        f"  run dir: {run_dir}\n"
        f"  logs:    {job.paths.stdout} (and .err; one pair per task)\n"
        f"  status:  python -m lejepa_scale.launch status {run_dir}",
        flush=True,
    )
    return 0


# -- command line ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lejepa_scale.launch",
        description="Submit LeJEPA training to SLURM (or run it locally); `status RUN_DIR` reports on a run.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--nodes", default="1", help="N, or MIN-MAX: SLURM starts the job on as many as are free")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only jobs")
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="data workers + 1 main process")
    p.add_argument("--mem-gb", type=int, help="per node; 0: all of the node's memory; default: the cluster's")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", default="72:00:00", help="SLURM time limit; the job requeues itself there")
    p.add_argument("--constraint")
    p.add_argument("--exclude", help="nodes to avoid, e.g. node[001-004]")
    p.add_argument("--signal-delay", type=int, default=180, help="USR2 this many seconds before the limit")
    p.add_argument("--network-interface", help="e.g. ib0: sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME")
    p.add_argument("--max-retries", type=int, default=3, help="automatic requeues after a crash")
    p.add_argument(
        "--max-node-failures", type=int, default=20, help="automatic requeues after a node failure"
    )
    p.add_argument("--max-timeouts", type=int, default=1000, help="requeues at the time limit")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    p.add_argument("--local", type=int, default=0, metavar="N", help="run here with N processes")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        status_parser = argparse.ArgumentParser(prog="python -m lejepa_scale.launch status")
        status_parser.add_argument("run_dir", type=Path)
        status_parser.add_argument("--json", action="store_true")
        args = status_parser.parse_args(argv[1:])
        if not args.run_dir.is_dir():
            sys.exit(
                f"error: {args.run_dir} is not a run directory (give the run.dir a job was launched with)"
            )
        status = run_status(args.run_dir.resolve())
        print(json.dumps(status, indent=2)) if args.json else print_status(status)
        return
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        sys.exit(submit(args))
    except ConfigError as e:
        sys.exit(f"config error, nothing submitted: {e}")


if __name__ == "__main__":
    main()
