"""The one place a Config becomes components: model (plain or FSDP2-sharded), loss, optimizer, LR
schedule, data loader, photometric stage, online probe, checkpointer, the step and the metrics
logger (`build_run` puts a run's set-up together). Each function reads the config sections its
component needs and nothing else; the components themselves take plain arguments."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from timm.optim import param_groups_weight_decay
from torch.distributed.checkpoint.stateful import Stateful

from data_pipeline.builtin import BUILTIN, load_builtin
from data_pipeline.indexed import IndexedViews, MemorySource, ShardSource
from data_pipeline.shards import is_remote, resolve_classes, resolve_shards
from data_pipeline.stream import ShardViews
from data_pipeline.views import CropSpec, Photometric
from lejepa_scale.checkpointing.checkpoint import (
    Checkpointer,
    check_same_model,
    complete_checkpoints,
    resolve_checkpoint,
)
from lejepa_scale.checkpointing.safe_loading import read_model_tensors
from lejepa_scale.checkpointing.states import ModelState, OptimizerState
from lejepa_scale.config import Config, ConfigError, batches, to_yaml
from lejepa_scale.distributed.collectives import from_rank0
from lejepa_scale.distributed.float8 import float8_scale_update
from lejepa_scale.distributed.parallel import parallelize
from lejepa_scale.distributed.process_groups import DistEnv, build_mesh
from lejepa_scale.method.initial_weights import backbone_weights, load_weights
from lejepa_scale.method.model import LeJEPAModel, create_backbone
from lejepa_scale.method.objective import LeJEPALoss
from lejepa_scale.method.sigreg import SIGReg
from lejepa_scale.method.swa import WeightAverage
from lejepa_scale.training.flops import step_flops
from lejepa_scale.training.metrics import MetricsLogger
from lejepa_scale.training.online_probe import OnlineProbe
from lejepa_scale.training.rng import RandomState
from lejepa_scale.training.schedule import warmup_cosine
from lejepa_scale.training.step import TrainingStep

log = logging.getLogger("lejepa_scale.train")


def check_model(cfg: Config) -> None:
    """An unknown timm name or backbone arguments timm refuses, as a ConfigError naming the key,
    before a process group starts or a job is queued: the backbone is built on the meta device."""
    if not timm.is_model(cfg.model.name):
        raise ConfigError(f"model.name {cfg.model.name!r} is not a timm model (see timm.list_models())")
    kwargs = dict(cfg.model.backbone_kwargs)
    try:
        with torch.device("meta"):
            backbone = create_backbone(cfg.model.name, img_size=cfg.views.global_size, **kwargs)
    except Exception as e:
        raise ConfigError(
            f"model.backbone_kwargs {kwargs}: timm cannot build {cfg.model.name} with them "
            f"({type(e).__name__}: {e})".split("\n")[0]
        ) from e
    if cfg.parallel.float8 and hasattr(backbone, "patch_embed"):
        check_float8_tokens(cfg, backbone.patch_embed.patch_size[0], backbone.num_prefix_tokens)


def check_float8_tokens(cfg: Config, patch: int, prefix_tokens: int) -> None:
    """Float8 matmuls (torch._scaled_mm) need every inner dimension divisible by 16; in a block's
    weight-gradient matmul that is the token count of one call: views x batch x tokens per view.
    GPUs check it only in the first backward; here it fails before anything runs."""
    views = ((cfg.views.n_global, cfg.views.global_size), (cfg.views.n_local, cfg.views.local_size))
    for n, size in views:
        tokens = (size // patch) ** 2 + prefix_tokens
        if n and n * cfg.train.batch_size * tokens % 16:
            multiple = 16 // math.gcd(16, n * tokens)
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size}: with parallel.float8 a block's token count must "
                f"be divisible by 16, and {n} views x {cfg.train.batch_size} images x {tokens} tokens "
                f"({size} px) is not: use a multiple of {multiple} (or parallel.float8=false)"
            )


def build_model(cfg: Config) -> LeJEPAModel:
    """The model, initialised from `run.seed` (so a 'random init' baseline is the same draw); the
    process's own random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return LeJEPAModel(
            cfg.model.name,
            img_size=cfg.views.global_size,
            proj_hidden_dim=cfg.model.proj_hidden_dim,
            proj_dim=cfg.model.proj_dim,
            proj_embed_dim=cfg.model.proj_embed_dim,
            drop_path=cfg.model.drop_path,
            backbone_kwargs=dict(cfg.model.backbone_kwargs),
        )


def build_parallel_model(cfg: Config, env: DistEnv, initialize: bool = True) -> LeJEPAModel:
    """The model on this rank: FSDP2-sharded (HSDP with parallel.dp_replicate > 1) when
    torch.distributed runs, plain otherwise; initialised as a single process would with run.seed,
    or, without `initialize`, left for a checkpoint to fill."""
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
        float8=cfg.parallel.float8_recipe if cfg.parallel.float8 else None,
        float8_all_gather=cfg.parallel.float8_all_gather,
        initialize=initialize,
        load=initial_weights(cfg) if initialize else None,
    )


def initial_weights(cfg: Config):
    """What a fresh run loads over its seeded initialisation, as a function of the model built (it
    reads the weights on the rank that builds the whole model): `model.init_from` into the backbone,
    or `checkpoint.load_from` (weights only) into the whole model, refused when the run it names
    trained another model; None for neither."""
    if cfg.model.init_from:
        source = cfg.model.init_from
        return lambda model: load_weights(
            model.backbone, backbone_weights(source), f"model.init_from {source}"
        )
    if cfg.checkpoint.load_from and cfg.checkpoint.load_model_only:
        step_dir = resolve_checkpoint(cfg.checkpoint.load_from)
        check_same_model(cfg.model, step_dir)
        return lambda model: load_weights(
            model, read_model_tensors(step_dir), f"checkpoint.load_from {step_dir}"
        )
    return None


def build_swa(cfg: Config, env: DistEnv, model: LeJEPAModel) -> WeightAverage | None:
    """The SWA target, when `model.swa_target`: a second model sharded like `model`, holding the
    average (its weights come from `model`, so it is only allocated)."""
    if not cfg.model.swa_target:
        return None
    return WeightAverage(build_parallel_model(cfg, env, initialize=False), model, cfg.model.swa_start)


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
    """Fused AdamW (one kernel per step, and it skips an update on the device when told the
    gradient was not finite) without weight decay on biases, norms, position embeddings and tokens."""
    no_decay = {f"backbone.{name}" for name in getattr(model.backbone, "no_weight_decay", set)()}
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `optim.warmup_steps`, then cosine down to lr * `final_lr_ratio`."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.final_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total, floor)
    )


def crop_specs(cfg: Config) -> list[CropSpec]:
    """Global crops first, then local crops (none when views.n_local = 0)."""
    v = cfg.views
    specs = [CropSpec(v.n_global, v.global_size, v.global_scale)]
    if v.n_local > 0:
        specs.append(CropSpec(v.n_local, v.local_size, v.local_scale))
    return specs


def build_loader(cfg: Config, env: DistEnv) -> tuple[IndexedViews | ShardViews, int | None, str]:
    """This rank's micro-batches of uint8 multi-crop views (with each view's photometric parameters),
    the number of classes if labels exist, and what the data is (for the start log: a built-in set
    may have fallen back to another). Built-in sets and local plain-tar shards are read in the
    world-size-free global order (`data.order=indexed`); `stream` reads shards rank by rank."""
    split = batches(cfg, env.world_size)
    common = dict(crops=crop_specs(cfg), photometric=build_photometric(cfg), flip_p=cfg.views.flip_p,
                  seed=cfg.run.seed, rank=env.rank, world_size=env.world_size,
                  pin_memory=env.device.type == "cuda")  # fmt: skip
    indexed = dict(
        global_batch=split.global_size, micro_batch=split.micro, block_shards=cfg.data.shuffle_shards
    )
    if cfg.data.mixture:
        sources = [data_source(m["train"], m.get("name"), cfg) for m in cfg.data.mixture]
        weights = [float(m.get("weight", 1.0)) for m in cfg.data.mixture]
        loader = IndexedViews(sources, weights=weights, num_workers=cfg.data.num_workers, **indexed, **common)
        parts = ", ".join(f"{s.name} ({w:g})" for s, w in zip(sources, weights, strict=True))
        return loader, None, f"a mixture of {parts}"
    if cfg.data.source != "shards":
        source = data_source(cfg.data.source, None, cfg)
        loader = IndexedViews([source], **indexed, **common)
        return loader, int(source.labels.max()) + 1, f"{source.name}, {len(source.images)} images"
    shards = resolve_shards(cfg.data.train)
    what = f"{sum(s.count for s in shards)} images in {len(shards)} shards of {cfg.data.train}"
    classes = resolve_classes(cfg.data.train)
    plain = all(s.path.endswith(".tar") and not is_remote(s.path) for s in shards)
    if cfg.data.order == "indexed" and not plain:
        raise ConfigError("data.order=indexed reads plain .tar shards by index; these are compressed or "
                          "remote: use data.order=stream (or auto)")  # fmt: skip
    if cfg.data.order == "stream" or not plain:
        loader = ShardViews(shards, batch_size=split.micro, num_workers=cfg.data.num_workers,
                            shuffle_buffer=cfg.data.shuffle_buffer, **common)  # fmt: skip
        return loader, len(classes) if classes else None, f"{what}, streamed by rank"
    source = ShardSource(str(cfg.data.train), shards)
    loader = IndexedViews([source], num_workers=cfg.data.num_workers, **indexed, **common)
    return loader, len(classes) if classes else None, what


def data_source(spec: str | list[str], name: str | None, cfg: Config) -> MemorySource | ShardSource:
    """A source of the indexed order: a built-in set's training split in memory, or local plain-tar
    shards (a mixture's entries must be read by index)."""
    if isinstance(spec, str) and spec in BUILTIN:
        dataset = load_builtin(spec, cfg.data.root)
        return MemorySource(name or dataset.name, dataset.train_images, dataset.train_labels)
    shards = resolve_shards(spec)
    if not all(s.path.endswith(".tar") and not is_remote(s.path) for s in shards):
        raise ConfigError(
            f"{spec}: a mixture reads its sources by index, which needs local plain .tar shards"
        )
    return ShardSource(name or (spec if isinstance(spec, str) else spec[0]), shards)


def build_photometric(cfg: Config) -> Photometric:
    return Photometric(cfg.views.photometric, mean=cfg.views.mean, std=cfg.views.std)


def build_probe(cfg: Config, feature_dim: int, num_classes: int | None, env: DistEnv) -> OnlineProbe | None:
    """The online linear probe, when it is on and the data has labels; initialised from `run.seed`, so
    it starts identical on every rank and in every run."""
    if not (cfg.train.online_probe and num_classes):
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return OnlineProbe(feature_dim, num_classes, env.device)


def build_checkpointer(
    cfg: Config, env: DistEnv, state: dict[str, Stateful], per_rank: dict[str, Stateful], meta: dict[str, Any]
) -> Checkpointer:
    """Under HSDP, replica r is the ranks r * S .. (r + 1) * S - 1 (the mesh is (replicas, S))."""
    c, replicas = cfg.checkpoint, cfg.parallel.dp_replicate if env.world_size > 1 else 1
    return Checkpointer(
        Path(cfg.run.dir) / "checkpoints",
        state,
        per_rank,
        meta,
        every_steps=c.every_steps,
        every_minutes=c.every_minutes,
        keep_last=c.keep_last,
        keep_every=c.keep_every,
        async_save=c.async_save,
        enabled=c.enabled,
        device=env.device,
        replica=(env.rank // (env.world_size // replicas), replicas),
        replicate_group=build_mesh(env, replicas).get_group("dp_replicate") if replicas > 1 else None,
        staging_wait_every_step=cfg.train.sync_debug,
    )


def build_metrics_logger(
    cfg: Config, env: DistEnv, model: LeJEPAModel, start_step: int, meta: dict[str, Any]
) -> MetricsLogger:
    """The metrics sink of a run starting at `start_step`; the wandb run id it continues (from the
    checkpoint's `meta`, else the run dir) goes into `meta`, so every later checkpoint carries it."""
    per_rank = batches(cfg, env.world_size).per_rank
    logger = MetricsLogger(
        Path(cfg.run.dir), cfg.train.steps, start_step=start_step, enabled=env.is_main,
        batch_size=per_rank, world_size=env.world_size, device=env.device,
        flops_per_step=step_flops(model, cfg, per_rank), lam=cfg.loss.lam, alpha=cfg.log.alpha,
        alarm_after=cfg.optim.warmup_steps, wandb_setting=cfg.log.wandb, run_id=meta.get("wandb_run_id"),
        project=cfg.log.project, entity=cfg.log.entity, name=cfg.run.name,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )  # fmt: skip
    if logger.run_id:
        meta["wandb_run_id"] = logger.run_id
    return logger


@dataclass
class Run:
    """A run's components, as the training loop uses them."""

    model: LeJEPAModel
    loader: IndexedViews | ShardViews
    step: TrainingStep
    checkpointer: Checkpointer
    meta: dict[str, Any]  # what every checkpoint's meta.json adds: the resolved config, the wandb run id


def build_run(cfg: Config, env: DistEnv) -> Run:
    """Every component of a run, wired together, and the start line logged. A run that will resume
    (or start from another run's whole state) only allocates its model: the checkpoint fills it."""
    if env.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resuming = from_rank0(
        cfg.checkpoint.enabled and bool(complete_checkpoints(Path(cfg.run.dir) / "checkpoints"))
    )
    whole_state = cfg.checkpoint.load_from and not cfg.checkpoint.load_model_only  # the checkpoint fills it
    t_build, initialize = time.perf_counter(), not (resuming or whole_state)
    model = build_parallel_model(cfg, env, initialize=initialize)
    t_build = time.perf_counter() - t_build
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loader, num_classes, data = build_loader(cfg, env)
    probe = build_probe(cfg, model.feature_dim, num_classes, env)
    swa = build_swa(cfg, env, model)
    rng = RandomState({}, env.rank)  # drop path draws from torch's stream; views carry their own
    rng.seed(cfg.run.seed)
    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "schedule": scheduler}
    state |= {name: part for name, part in (("probe", probe), ("swa", swa)) if part is not None}
    meta = {"config": to_yaml(cfg)}
    checkpointer = build_checkpointer(cfg, env, state, {"loader": loader, "rng": rng}, meta)
    step = TrainingStep(
        model=model, loss_fn=build_loss(cfg), optimizer=optimizer, scheduler=scheduler,
        photometric=build_photometric(cfg),
        autocast=torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"),
        device=env.device, n_global=cfg.views.n_global, clip_grad=cfg.optim.clip_grad, probe=probe,
        target=swa, before_update=checkpointer.wait_for_staging, after_update=float8_scale_update(model),
        data_counters=loader.counters,
    )  # fmt: skip
    if env.is_main:
        split, params = batches(cfg, env.world_size), sum(p.numel() for p in model.parameters()) / 1e6
        built = "initialised" if initialize else "allocated for a checkpoint"
        log.info("%s: %.1fM parameters, %d rank(s) on %s, %d steps of %d samples (%d per rank: %d x %d) "
                 "(data: %s); model %s in %.2f s", cfg.model.name, params, env.world_size, env.device.type,
                 cfg.train.steps, split.global_size, split.per_rank, split.accumulation, split.micro, data,
                 built, t_build)  # fmt: skip
        interfaces = {
            k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ
        }
        if interfaces:
            log.info("network interface: %s", ", ".join(f"{k}={v}" for k, v in interfaces.items()))
    return Run(model, loader, step, checkpointer, meta)
