"""`python -m lejepa_scale.train --config FILE [key=value ...]`: LeJEPA pretraining, top to bottom.

The same code runs in one process (CPU or one GPU) and under
`torchrun --nproc_per_node N -m lejepa_scale.train ...` (gloo on CPU, NCCL on GPU): a step takes
train.grad_accum_steps micro-batches of train.batch_size per rank (or train.global_batch_size in
all, whatever the world size), and SIGReg and the projector's BatchNorm use statistics of the
whole global batch.

One step: uint8 crops -> batched photometric augmentation on the device -> backbone forward (each
block takes both crop sizes in one call) -> projector -> (1 - λ)·prediction + λ·SIGReg -> backward
-> AdamW -> metrics (device values are read on the host only on logging steps) -> the save rules.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from lejepa_scale.checkpointing.checkpoint import Checkpointer
from lejepa_scale.cluster.attempts import Attempt, lost_peer
from lejepa_scale.cluster.preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag
from lejepa_scale.cluster.watchdog import HangWatchdog, slow_step_seconds, timeout_too_short
from lejepa_scale.config import Config, ConfigError, batches, load_config, to_yaml
from lejepa_scale.distributed.parallel import full_state_dict
from lejepa_scale.distributed.process_groups import DistEnv, init_distributed
from lejepa_scale.logging_setup import configure_logging
from lejepa_scale.method.model import LeJEPAModel
from lejepa_scale.training.build import Run, build_metrics_logger, build_run, check_model
from lejepa_scale.training.flops import step_flops
from lejepa_scale.training.metrics import SampleLog, peak_tflops
from lejepa_scale.training.profiling import step_profiler
from lejepa_scale.training.step import host_syncs_fail

log = logging.getLogger("lejepa_scale.train")


def train(cfg: Config, on_hang: Callable[[str], None] | None = None) -> LeJEPAModel:
    """Pretrain as `cfg` says, resuming the run if it has a checkpoint. `on_hang(reason)` runs when
    the watchdog finds no step completed for `train.hang_timeout` s (the launcher requeues there)."""
    env = init_distributed(cfg.train.device, cfg.parallel.timeout)
    run = build_run(cfg, env)
    check_cpus(cfg, env)
    check_hang_timeout(cfg, env, run.model)
    start_step = run.checkpointer.resume(cfg.model, cfg.checkpoint.load_from, cfg.checkpoint.load_model_only)
    if env.is_main:  # after a successful resume: a refused one leaves the run's config as it was
        (Path(cfg.run.dir) / "config.yaml").write_text(to_yaml(cfg))
    if start_step >= cfg.train.steps:
        return finished(cfg, env, run)
    preemption = PreemptionFlag()
    logger = build_metrics_logger(cfg, env, run.model, start_step, run.meta)
    sample_log = SampleLog(Path(cfg.run.dir), env.rank, start_step, cfg.log.sample_keys)
    if env.is_main:
        log.info("training from step %d", start_step)
    micro_batches, accumulation = iter(run.loader), batches(cfg, env.world_size).accumulation
    run.model.train()
    with (
        step_profiler(cfg.profile, Path(cfg.run.dir), env.rank, start_step) as profiler,
        HangWatchdog(cfg.train.hang_timeout, on_hang) as watchdog,
    ):
        for step in range(start_step, cfg.train.steps):
            last, health = step == cfg.train.steps - 1, step % cfg.log.health_every == 0
            logged = health or step % cfg.train.log_every == 0 or last
            t_start = time.perf_counter()
            batch = [next(micro_batches) for _ in range(accumulation)]
            t_data = time.perf_counter()
            with host_syncs_fail(cfg.train.sync_debug and not logged, env.device):  # the step proper
                result, counters = run.step(batch, step)
            logger.advance()
            sample_log.write(step, [key for micro_batch in batch for key in micro_batch.keys])
            profiler.step()
            if logged:
                out = result.output
                metrics = logger.log_step(
                    step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm, counters=counters,
                    seconds=time.perf_counter() - t_start, data_seconds=t_data - t_start,
                    embeddings=(out.z_global, out.z_local) if health else None,
                )  # fmt: skip
                stop_if_diverging(metrics["nonfinite_streak"], cfg, step, run.checkpointer)
            control = (step + 1) % cfg.train.control_every == 0 or last
            if run.checkpointer.after_step(
                step, last=last, control=control, stop_requested=preemption.received is not None
            ):
                logger.close()
                signum = preemption.received or signal.SIGTERM  # the signal reached another rank
                raise Preempted(
                    f"signal {signum} at step {step}: checkpoint saved, exiting to be requeued", signum
                )
            watchdog.beat(step)
    run.checkpointer.save(cfg.train.steps, blocking=True)
    logger.close()
    sample_log.close()
    write_final_weights(cfg, env, run.model)
    return run.model


def check_cpus(cfg: Config, env: DistEnv) -> None:
    """The CPUs this process may run on (SLURM binds tasks; since Slurm 22.05 srun does not inherit
    --cpus-per-task): logged, and a warning when the loader's workers and the trainer must share."""
    cpus = len(os.sched_getaffinity(0))
    needed = cfg.data.num_workers + 1 if cfg.data.source == "shards" else 1
    if env.is_main:
        log.info("CPUs available to each process: %d (rank 0)", cpus)
    if cpus < needed:
        log.warning("rank %d may run on %d CPU(s), but data.num_workers=%d loader workers and the trainer "
                    "need %d: ask SLURM for --cpus-per-task %d (srun must get it too), or lower "
                    "data.num_workers", env.rank, cpus, cfg.data.num_workers, needed, needed)  # fmt: skip


def check_hang_timeout(cfg: Config, env: DistEnv, model: LeJEPAModel) -> None:
    """The watchdog's timeout against the planner's step FLOPs on a GPU it knows the peak of."""
    flops, peak = step_flops(model, cfg, batches(cfg, env.world_size).per_rank), peak_tflops(env.device)
    if env.is_main and flops and peak:
        state_bytes = 12 * sum(p.numel() for p in model.parameters()) / env.world_size  # fp32 weights + AdamW
        warning = timeout_too_short(cfg.train.hang_timeout, slow_step_seconds(flops, peak, state_bytes))
        if warning:
            log.warning("%s", warning)


def stop_if_diverging(streak: float, cfg: Config, step: int, checkpointer: Checkpointer) -> None:
    """Stop after `train.max_nonfinite_steps` skipped updates in a row (read on logging steps)."""
    if streak >= cfg.train.max_nonfinite_steps:  # the streak is averaged over ranks: all stop here
        checkpointer.finish()
        raise FloatingPointError(
            f"the gradient was NaN/Inf for {streak:.0f} consecutive steps (last: step {step}); their updates "
            f"were skipped, so {checkpointer.latest()} holds the last good weights. "
            "Lower optim.lr or check the data."
        )


def write_final_weights(cfg: Config, env: DistEnv, model: LeJEPAModel) -> None:
    """`<run.dir>/model.pt`: the whole unsharded state dict (a collective: every rank takes part)."""
    if cfg.checkpoint.enabled:
        weights = full_state_dict(model)
        if env.is_main:
            torch.save(weights, Path(cfg.run.dir) / "model.pt")


def finished(cfg: Config, env: DistEnv, run: Run) -> LeJEPAModel:
    """A rerun of a complete run: say so and where its outputs are (model.pt is written if missing)."""
    run_dir = Path(cfg.run.dir)
    weights, latest = full_state_dict(run.model), run.checkpointer.latest()  # collectives: every rank
    if env.is_main:
        if not (run_dir / "model.pt").exists():
            torch.save(weights, run_dir / "model.pt")
        log.info("%s is complete (step %d of %d), nothing to train: final weights %s, checkpoint %s, "
                 "metrics %s; raise train.steps to train further", run_dir, cfg.train.steps,
                 cfg.train.steps, run_dir / "model.pt", latest,
                 run_dir / "metrics.jsonl")  # fmt: skip
    return run.model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lejepa_scale.train",
        description="LeJEPA pretraining in one process or under torchrun (train.batch_size is per rank).",
    )
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml); schema defaults without it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        check_model(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    # under slurm/train.sbatch, torchrun reports every failure as exit code 1: the trainers say why
    attempt = Attempt.from_env(Path(cfg.run.dir)) if "SLURM_JOB_ID" in os.environ else None
    try:
        train(cfg, on_hang=attempt and (lambda reason: attempt.note("hung", reason)))
    except Preempted as e:
        log.warning("%s", e)
        if attempt:
            attempt.note("stopped", f"{signal.Signals(e.signum).name} {e}")
        sys.exit(EXIT_PREEMPTED)
    except ConfigError as e:
        if attempt:
            attempt.note("error", str(e))
        sys.exit(f"error: {e}")
    except Exception as e:
        if attempt and not lost_peer(e):
            attempt.note("error", "".join(traceback.format_exception_only(e)).strip())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
