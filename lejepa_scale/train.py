"""`python -m lejepa_scale.train --config FILE [key=value ...]`: LeJEPA pretraining, top to bottom.

The same code runs in one process (CPU or one GPU) and under
`torchrun --nproc_per_node N -m lejepa_scale.train ...` (gloo on CPU, NCCL on GPU): train.batch_size
is per rank, the global batch is batch_size x world size, and SIGReg and the projector's BatchNorm
use statistics of the global batch.

One step: uint8 crops -> batched photometric augmentation on the device -> backbone forward (each
block takes both crop sizes in one call) -> projector -> (1 - λ)·prediction + λ·SIGReg -> backward
-> AdamW -> metrics (device values are read on the host only on logging steps).
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
from omegaconf import OmegaConf

from lejepa_scale.build import (
    build_checkpointer,
    build_loader,
    build_loss,
    build_optimizer,
    build_parallel_model,
    build_photometric,
    build_probe,
    build_scheduler,
    build_swa,
    check_model,
)
from lejepa_scale.checkpoint import (
    Checkpointer,
    complete_checkpoints,
    load_model_weights,
    read_meta,
    resolve_checkpoint,
)
from lejepa_scale.collectives import any_rank, from_rank0
from lejepa_scale.config import Config, ConfigError, from_yaml, load_config, to_yaml
from lejepa_scale.metrics import MetricsLogger, configure_logging, peak_tflops
from lejepa_scale.model import LeJEPAModel
from lejepa_scale.parallel import (
    DistEnv,
    float8_scale_update,
    full_state_dict,
    host_syncs_fail,
    init_distributed,
)
from lejepa_scale.plan import step_flops
from lejepa_scale.preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag
from lejepa_scale.profiling import step_profiler
from lejepa_scale.rng import RandomState
from lejepa_scale.slurm_job import Attempt, lost_peer
from lejepa_scale.states import ModelState, OptimizerState
from lejepa_scale.step import train_step
from lejepa_scale.watchdog import HangWatchdog, slow_step_seconds, timeout_too_short

log = logging.getLogger("lejepa_scale.train")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's random streams (drop path, augmentation): distinct on every rank."""
    return seed * 1000 + rank


ARCHITECTURE = ("name", "backbone_kwargs", "proj_hidden_dim", "proj_dim", "proj_embed_dim", "swa_target")


def check_same_model(cfg: Config, step_dir: Path) -> None:
    """A checkpoint holds the model its stored config describes: a different one cannot load into
    this run's model, so say which keys differ instead of listing missing tensors."""
    saved = from_yaml(read_meta(step_dir)["config"]).model
    differ = [
        f"model.{key} {getattr(saved, key)!r} (checkpoint) vs {getattr(cfg.model, key)!r} (requested)"
        for key in ARCHITECTURE
        if getattr(saved, key) != getattr(cfg.model, key)
    ]
    if differ:
        raise ConfigError(
            f"{step_dir} holds another model than the config asks for: {'; '.join(differ)}. Resume with "
            "the run's own config (its config.yaml) or start a new run.dir"
        )


def resume(cfg: Config, env: DistEnv, checkpointer: Checkpointer, model, loader, rng: RandomState) -> int:
    """Continue from this run's newest complete checkpoint, else start from `checkpoint.load_from`,
    else from scratch; returns the first step to run."""
    latest = checkpointer.latest()
    if latest is not None:
        check_same_model(cfg, latest)
        meta = checkpointer.load(latest)
        checkpointer.meta.update({k: v for k, v in meta.items() if k not in ("step", "world_size")})
        if meta["world_size"] != env.world_size:  # positions and RNG streams do not map across rank counts
            saved = Checkpointer.rank_state(latest, 0)["loader"]
            loader.restart_epoch(int(saved["epoch"]))
            rng.seed(rank_seed(meta["step"], env.rank))
            if env.is_main:
                log.warning(
                    "%s was written by %d ranks and this job has %d: model and optimizer are resharded "
                    "exactly, but the data position cannot be carried over. Epoch %d restarts from its first "
                    "batch: the %d samples it had already used (%d batches x %d ranks) are seen again, and "
                    "the per-rank random streams are reseeded.",
                    latest, meta["world_size"], env.world_size, saved["epoch"],
                    saved["batch"] * meta["world_size"] * cfg.train.batch_size, saved["batch"],
                    meta["world_size"],
                )  # fmt: skip
        return int(meta["step"])
    if not cfg.checkpoint.load_from:
        return 0
    source = resolve_checkpoint(cfg.checkpoint.load_from)  # a new run from another run's weights
    check_same_model(cfg, source)
    if cfg.checkpoint.load_model_only:
        load_model_weights(source, model, checkpointer.group)
        log.info("initialised from %s (weights)", source)
        return 0
    log.info("initialised from %s (full state)", source)
    return int(checkpointer.load(source)["step"])


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
    flops, peak = step_flops(cfg), peak_tflops(env.device)
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


def agree(step: int, preemption: PreemptionFlag, checkpointer: Checkpointer, logger: MetricsLogger) -> bool:
    """A control step: one packed collective tells every rank whether any received a preemption
    signal (then save and stop), whether any clock says a save is due (returned), and whether every
    rank has written the background save (then complete it)."""
    preempted, overdue, busy = any_rank(
        preemption.received is not None, checkpointer.overdue(), checkpointer.busy()
    )
    if not busy:
        checkpointer.finish()
    if preempted:
        checkpointer.save_before_exit(step + 1)
        logger.close()
        signum = preemption.received or signal.SIGTERM  # the signal reached another rank
        raise Preempted(f"signal {signum} at step {step}: checkpoint saved, exiting to be requeued", signum)
    return overdue


def train(cfg: Config, on_hang: Callable[[str], None] | None = None) -> LeJEPAModel:
    """Pretrain as `cfg` says, resuming the run if it has a checkpoint. `on_hang(reason)` runs when
    the watchdog finds no step completed for `train.hang_timeout` s (the launcher requeues there)."""
    env = init_distributed(cfg.train.device, cfg.parallel.timeout)
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    resuming = from_rank0(cfg.checkpoint.enabled and bool(complete_checkpoints(run_dir / "checkpoints")))
    t_build, initialize = time.perf_counter(), not (resuming or cfg.checkpoint.load_from)
    model = build_parallel_model(cfg, env, initialize=initialize)
    t_build = time.perf_counter() - t_build
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loader, num_classes, data = build_loader(cfg, env)
    photometric = build_photometric(cfg)
    probe = build_probe(cfg, model.feature_dim, num_classes, env)
    swa = build_swa(cfg, env, model)
    augment_gen = torch.Generator(device=env.device)
    rng = RandomState({"augment": augment_gen})
    rng.seed(rank_seed(cfg.run.seed, env.rank))
    float8_scales = float8_scale_update(model)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    if env.is_main:
        log.info("%s: %.1fM parameters, %d rank(s) on %s, %d steps of %d per rank (data: %s); model %s in "
                 "%.2f s", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, env.world_size,
                 env.device.type, cfg.train.steps, cfg.train.batch_size, data,
                 "initialised" if initialize else "allocated for a checkpoint", t_build)  # fmt: skip
        interfaces = {
            k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ
        }
        if interfaces:
            log.info("network interface: %s", ", ".join(f"{k}={v}" for k, v in interfaces.items()))
    check_cpus(cfg, env)
    check_hang_timeout(cfg, env, model)

    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "schedule": scheduler}
    state |= {name: part for name, part in (("probe", probe), ("swa", swa)) if part is not None}
    run_meta = {"config": to_yaml(cfg)}  # in every checkpoint's meta.json, with the wandb run id
    checkpointer = build_checkpointer(cfg, env, state, {"loader": loader, "rng": rng}, run_meta)
    start_step = resume(cfg, env, checkpointer, model, loader, rng)
    if env.is_main:  # after a successful resume: a refused one leaves the run's config as it was
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if start_step >= cfg.train.steps:
        return finished(cfg, env, model, run_dir, checkpointer)
    preemption = PreemptionFlag()
    logger = MetricsLogger(
        run_dir, cfg.train.steps, start_step=start_step, enabled=env.is_main, batch_size=cfg.train.batch_size,
        world_size=env.world_size, device=env.device, flops_per_step=step_flops(cfg), lam=cfg.loss.lam,
        alpha=cfg.log.alpha, alarm_after=cfg.optim.warmup_steps, wandb_setting=cfg.log.wandb,
        run_id=run_meta.get("wandb_run_id"), project=cfg.log.project, entity=cfg.log.entity,
        name=cfg.run.name, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )  # fmt: skip
    if logger.run_id:
        run_meta["wandb_run_id"] = logger.run_id

    if env.is_main:
        log.info("training from step %d", start_step)
    batches = iter(loader)
    skipped = streak = torch.zeros((), device=env.device)  # skipped updates: in all, and in a row
    model.train()
    with (
        step_profiler(cfg.profile, run_dir, env.rank, start_step) as profiler,
        HangWatchdog(cfg.train.hang_timeout, on_hang) as watchdog,
    ):
        for step in range(start_step, cfg.train.steps):
            last, health = step == cfg.train.steps - 1, step % cfg.log.health_every == 0
            logged = health or step % cfg.train.log_every == 0 or last
            t_start = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter()
            with host_syncs_fail(cfg.train.sync_debug and not logged, env.device):  # the step proper
                views = [photometric(v.to(env.device, non_blocking=True), augment_gen) for v in batch.views]
                result = train_step(
                    model, loss_fn, optimizer, scheduler, views, step, autocast,
                    clip_grad=cfg.optim.clip_grad, before_update=checkpointer.wait_for_staging,
                    after_update=float8_scales, target=swa,
                )  # fmt: skip
                skipped, streak = skipped + result.skipped, (streak + 1) * result.skipped
                counters = {"skipped_nonfinite": skipped, "nonfinite_streak": streak,
                            "corrupt_samples": getattr(loader, "corrupt_total", 0)}  # fmt: skip
                if probe is not None and batch.labels is not None:
                    labels = batch.labels.to(env.device, non_blocking=True).repeat(cfg.views.n_global)
                    features = result.output.features_global.flatten(0, 1)
                    counters["probe_loss"], counters["probe_acc"] = probe.step(features, labels)
            logger.advance()
            profiler.step()
            if logged:
                out = result.output
                metrics = logger.log_step(
                    step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm, counters=counters,
                    seconds=time.perf_counter() - t_start, data_seconds=t_data - t_start,
                    embeddings=(out.z_global, out.z_local) if health else None,
                )  # fmt: skip
                stop_if_diverging(metrics["nonfinite_streak"], cfg, step, checkpointer)
            saved = not last and checkpointer.due(step + 1)
            if saved:  # before the agreement: a preemption right now completes this save
                checkpointer.save(step + 1)
            control = (step + 1) % cfg.train.control_every == 0 or last
            if control and agree(step, preemption, checkpointer, logger) and not (last or saved):
                checkpointer.save(step + 1)  # the time rule
            if cfg.train.sync_debug:  # the staging thread's syncs happen here, not inside a checked step
                checkpointer.wait_for_staging()
            watchdog.beat(step)
    checkpointer.save(cfg.train.steps, blocking=True)
    logger.close()
    if cfg.checkpoint.enabled:
        weights = full_state_dict(model)
        if env.is_main:
            torch.save(weights, run_dir / "model.pt")
    return model


def finished(cfg: Config, env: DistEnv, model: LeJEPAModel, run_dir: Path, checkpointer: Checkpointer):
    """A rerun of a complete run: say so and where its outputs are (model.pt is written if missing)."""
    weights, latest = full_state_dict(model), checkpointer.latest()  # collectives: every rank takes part
    if env.is_main:
        if not (run_dir / "model.pt").exists():
            torch.save(weights, run_dir / "model.pt")
        log.info("%s is complete (step %d of %d), nothing to train: final weights %s, checkpoint %s, "
                 "metrics %s; raise train.steps to train further", run_dir, cfg.train.steps,
                 cfg.train.steps, run_dir / "model.pt", latest,
                 run_dir / "metrics.jsonl")  # fmt: skip
    return model


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
