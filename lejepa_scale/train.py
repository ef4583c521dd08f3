"""`python -m lejepa_scale.train --config FILE [key=value ...]`: LeJEPA pretraining, top to bottom.

The same code runs in one process (CPU or one GPU) and under
`torchrun --nproc_per_node N -m lejepa_scale.train ...` (gloo on CPU, NCCL on GPU): train.batch_size
is per rank, the global batch is batch_size x world size, and SIGReg and the projector's BatchNorm
use statistics of the global batch.

One step: uint8 crops -> batched photometric augmentation on the device -> backbone forward per
crop size -> projector -> (1 - λ)·prediction + λ·SIGReg -> backward -> AdamW -> metrics.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from timm.optim import param_groups_weight_decay
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from data_pipeline.builtin import load_builtin
from data_pipeline.in_memory import InMemoryViews
from data_pipeline.shards import resolve_classes, resolve_shards
from data_pipeline.stream import ShardViews
from data_pipeline.views import CropSpec, MultiCrop, Photometric, PhotometricSpec
from lejepa_scale.checkpoint import (
    EXIT_PREEMPTED,
    Checkpointer,
    Preempted,
    PreemptionFlag,
    TrainState,
    load_model_weights,
    resolve_checkpoint,
)
from lejepa_scale.config import Config, load_config, to_yaml
from lejepa_scale.health import collapse_alarm, embedding_health
from lejepa_scale.metrics import MetricsLogger, peak_tflops, scaled_loss, step_flops, throughput
from lejepa_scale.model import LeJEPAModel, ModelOutput
from lejepa_scale.objective import LeJEPALoss, LossParts
from lejepa_scale.parallel import DistEnv, build_mesh, init_distributed, parallelize
from lejepa_scale.probe import OnlineProbe
from lejepa_scale.sigreg import SIGReg

log = logging.getLogger("lejepa_scale.train")


def build_model(cfg: Config) -> LeJEPAModel:
    """The model, initialised from `run.seed` (so a 'random init' baseline is the same draw)."""
    torch.manual_seed(cfg.run.seed)
    return LeJEPAModel(
        cfg.model.name,
        img_size=cfg.views.global_size,
        proj_hidden_dim=cfg.model.proj_hidden_dim,
        proj_dim=cfg.model.proj_dim,
        drop_path=cfg.model.drop_path,
        backbone_kwargs=dict(cfg.model.backbone_kwargs),
    )


def crop_specs(cfg: Config) -> list[CropSpec]:
    v = cfg.views
    specs = [CropSpec(v.n_global, v.global_size, v.global_scale)]
    if v.n_local > 0:
        specs.append(CropSpec(v.n_local, v.local_size, v.local_scale))
    return specs


def photometric_spec(cfg: Config) -> PhotometricSpec:
    v = cfg.views
    return PhotometricSpec(
        jitter_p=v.jitter_p,
        brightness=v.brightness,
        contrast=v.contrast,
        saturation=v.saturation,
        hue=v.hue,
        grayscale_p=v.grayscale_p,
        blur_p=v.blur_p,
        solarize_p=v.solarize_p,
        mean=v.mean,
        std=v.std,
    )


def build_loader(cfg: Config, env: DistEnv) -> tuple[InMemoryViews | ShardViews, int | None]:
    """This rank's stream of uint8 multi-crop batches, and the number of classes if labels exist."""
    if cfg.data.source == "shards":
        loader = ShardViews(
            resolve_shards(cfg.data.train),
            batch_size=cfg.train.batch_size,
            crops=crop_specs(cfg),
            flip_p=cfg.views.flip_p,
            seed=cfg.run.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=env.device.type == "cuda",
        )
        classes = resolve_classes(cfg.data.train)
        return loader, len(classes) if classes else None
    dataset = load_builtin(cfg.data.source, cfg.data.root)
    loader = InMemoryViews(
        dataset.train_images,
        dataset.train_labels,
        batch_size=cfg.train.batch_size,
        crops=MultiCrop(crop_specs(cfg), flip_p=cfg.views.flip_p),
        seed=cfg.run.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    return loader, dataset.num_classes


def build_parallel_model(cfg: Config, env: DistEnv) -> LeJEPAModel:
    """The model on this rank: FSDP2-sharded (HSDP with parallel.dp_replicate > 1) when
    torch.distributed runs, plain otherwise; initialised as a single process would with run.seed."""
    mesh = build_mesh(env, cfg.parallel.dp_replicate) if dist.is_initialized() else None
    return parallelize(
        lambda: build_model(cfg),
        env,
        mesh,
        param_dtype=cfg.train.precision,
        reduce_dtype=cfg.parallel.reduce_dtype,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        ac_every=cfg.parallel.ac_every,
        compile=cfg.parallel.compile,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
    )


def build_loss(cfg: Config) -> LeJEPALoss:
    sigreg = SIGReg(
        cfg.loss.num_slices,
        t_max=cfg.loss.t_max,
        knots=cfg.loss.knots,
        integration=cfg.loss.integration,
        unbiased=cfg.loss.unbiased,
    )
    return LeJEPALoss(cfg.loss.lam, sigreg)


def build_optimizer(model: LeJEPAModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, position embeddings and tokens."""
    no_decay = {f"backbone.{name}" for name in getattr(model.backbone, "no_weight_decay", set)()}
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


def warmup_cosine(cfg: Config):
    """lr multiplier: linear warm-up from 0, then cosine down to `final_lr_ratio`."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.final_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_step(
    model: LeJEPAModel,
    loss_fn: LeJEPALoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    views: list[torch.Tensor],
    step: int,
    autocast: torch.autocast,
    before_update=None,
) -> tuple[LossParts, ModelOutput, float, torch.Tensor, bool]:
    """Forward every crop size, the LeJEPA loss (SIGReg over the global batch), backward, AdamW.
    A non-finite loss on any rank skips the update on every rank. Returns the loss parts, the model
    output, the learning rate this step used, the gradient norm and whether the update was applied.
    `before_update` runs right before parameters change (the checkpointer waits there for its
    background copy)."""
    with autocast:
        out = model(views[0], views[1] if len(views) > 1 else None)
    parts = loss_fn(out.z_global, out.z_local, step)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    norm = grad_norm(model)
    lr = optimizer.param_groups[0]["lr"]
    finite = torch.isfinite(parts.total.detach()).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if before_update is not None:
        before_update()
    if applied:
        optimizer.step()
    scheduler.step()
    return parts, out, lr, norm, applied


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) gradient; the same value on every rank. A tensor, so
    steps that do not log it never wait for the device."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks (each rank's prediction loss is its local batch's)."""
    if not dist.is_initialized():
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(values, (packed / dist.get_world_size()).tolist(), strict=True))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, wrapper-free state dict on rank 0 (empty elsewhere), on CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train(cfg: Config) -> LeJEPAModel:
    env = init_distributed(cfg.train.device)
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    model = build_parallel_model(cfg, env)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    loader, num_classes = build_loader(cfg, env)
    photometric = Photometric(photometric_spec(cfg))
    augment_gen = torch.Generator(device=env.device).manual_seed(cfg.run.seed * 1000 + env.rank)
    torch.manual_seed(cfg.run.seed * 1000 + env.rank)  # per-rank drop-path and dropout draws
    probe = None
    if cfg.train.online_probe and num_classes:
        probe = OnlineProbe(model.feature_dim, num_classes).to(env.device)
    if env.is_main:
        log.info(
            "%s: %.1fM parameters, %d rank(s) on %s, %d steps of %d per rank (%s data)",
            cfg.model.name,
            sum(p.numel() for p in model.parameters()) / 1e6,
            env.world_size,
            env.device.type,
            cfg.train.steps,
            cfg.train.batch_size,
            cfg.data.source,
        )

    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        every_steps=cfg.checkpoint.every_steps,
        every_minutes=cfg.checkpoint.every_minutes,
        keep_last=cfg.checkpoint.keep_last,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
    )
    run_meta = {"config": to_yaml(cfg)}  # the checkpoint's meta.json also gets the wandb run id
    state = TrainState(model, optimizer, scheduler, loader, {"augment": augment_gen}, probe, run_meta)
    latest = checkpointer.latest()
    start_step = checkpointer.load(latest, state) if latest is not None else 0
    if latest is None and cfg.checkpoint.load_from:  # a new run that starts from another run's weights
        source = resolve_checkpoint(cfg.checkpoint.load_from)
        if cfg.checkpoint.load_model_only:
            load_model_weights(source, model, checkpointer.group)
        else:
            start_step = checkpointer.load(source, state)
        log.info(
            "initialised from %s (%s)", source, "weights" if cfg.checkpoint.load_model_only else "full state"
        )
    preemption = PreemptionFlag()

    logger = MetricsLogger(
        run_dir,
        cfg.train.steps,
        start_step=start_step,
        enabled=env.is_main,
        wandb_setting=cfg.log.wandb,
        run_id=run_meta.get("wandb_run_id"),
        project=cfg.log.project,
        entity=cfg.log.entity,
        name=cfg.run.name,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )
    if logger.run_id:
        run_meta["wandb_run_id"] = logger.run_id
    global_batch = cfg.train.batch_size * env.world_size
    flops, peak = step_flops(cfg), peak_tflops(env.device)  # model FLOPs per rank-step, GPU peak
    batches = iter(loader)
    bad_steps = skipped = 0
    model.train()
    for step in range(start_step, cfg.train.steps):
        t_start = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter()
        views = [photometric(v.to(env.device, non_blocking=True), augment_gen) for v in batch.views]
        parts, out, lr, norm, applied = train_step(
            model, loss_fn, optimizer, scheduler, views, step, autocast, checkpointer.wait_for_staging
        )
        bad_steps = 0 if applied else bad_steps + 1
        skipped += 0 if applied else 1
        if bad_steps >= cfg.train.max_nonfinite_steps:  # agreed by every rank (train_step all-reduces)
            checkpointer.finish()
            raise FloatingPointError(
                f"the loss was NaN/Inf for {bad_steps} consecutive steps (last: step {step}); their updates "
                f"were skipped, so {checkpointer.latest()} holds the last good weights. "
                "Lower optim.lr or check the data."
            )
        probe_metrics = {}
        if probe is not None and batch.labels is not None:
            labels = batch.labels.to(env.device).repeat(cfg.views.n_global)
            probe_loss, probe_acc = probe.step(out.features_global.flatten(0, 1), labels)
            probe_metrics = {"probe_loss": probe_loss, "probe_acc": probe_acc}
        logger.advance()
        check_health = step % cfg.log.health_every == 0
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1 or check_health:
            t_step = time.perf_counter() - t_start
            metrics = mean_over_ranks(
                {
                    "loss": parts.total.item(),
                    "pred": parts.prediction.item(),
                    "sigreg": parts.sigreg.item(),
                    "data_wait": (t_data - t_start) / t_step,
                    "corrupt_samples": getattr(loader, "corrupt_total", 0),
                    "skipped_nonfinite": skipped,
                    **probe_metrics,
                },
                env.device,
            )
            metrics.update(scaled_loss=scaled_loss(metrics["loss"], cfg), lr=lr, grad_norm=norm.item())
            metrics.update(throughput(t_step, cfg.train.batch_size, env.world_size, env.device, flops, peak))
            if check_health:
                metrics.update(
                    embedding_health(out.z_global, out.z_local, parts.sigreg_per_view, global_batch)
                )
                alarm = collapse_alarm(metrics)
                if alarm and step >= cfg.optim.warmup_steps and env.is_main:
                    log.warning("step %d: %s", step, alarm)
            logger.log(step, metrics)
        checkpointer.poll()
        if preemption.any_rank():
            checkpointer.save(step + 1, state, blocking=True)
            logger.close()
            raise Preempted(
                f"signal {preemption.received} at step {step}: checkpoint saved, exiting to be requeued",
                preemption.received,
            )
        if step + 1 < cfg.train.steps and checkpointer.due(step + 1):
            checkpointer.save(step + 1, state)
    if latest is None or start_step < cfg.train.steps:
        checkpointer.save(cfg.train.steps, state, blocking=True)
    logger.close()
    weights = full_state_dict(model)
    if env.is_main:
        torch.save(weights, run_dir / "model.pt")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml); schema defaults without it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except Preempted as e:
        log.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
