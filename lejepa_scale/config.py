"""The typed config: dataclass schema, YAML recipes, dotted `key=value` overrides, validation.

`load_config(path, overrides)` merges schema defaults <- recipe YAML <- CLI overrides through
OmegaConf structured configs, so an unknown key or a value of the wrong type fails at once with an
error that names the full key, before anything runs or is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.builtin import BUILTIN
from data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD, PhotometricSpec


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


@dataclass
class RunConfig:
    dir: str = MISSING  # the run directory: resolved config, metrics, checkpoints
    seed: int = 0
    name: str = "lejepa"


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"  # any timm model name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    proj_hidden_dim: int = 2048
    proj_dim: int = 128  # the paper found small outputs (64-128) slightly better than 512+
    proj_embed_dim: int = 0  # a Linear to this width before the MLP, as the official code (512); 0: none
    swa_target: bool = False  # centres from a weight average of the model (the paper's Table 4, ViTs)
    swa_start: int = 0  # the step the average starts at (before, it follows the model)
    drop_path: float = 0.0
    # a fresh run's backbone weights: a .safetensors/.pth/.pt file (timm's, an export, a run's model.pt),
    # a run directory, or timm:NAME (timm's pretrained weights); pos_embed resampled to views.global_size
    init_from: str | None = None


@dataclass
class ViewsConfig:
    n_global: int = 2
    n_local: int = 6
    global_size: int = 224
    local_size: int = 96  # 98 for patch-14 models
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.3)
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation, in training and evaluation
    std: tuple[float, float, float] = IMAGENET_STD
    photometric: PhotometricSpec = field(default_factory=PhotometricSpec)  # colour, blur, solarize


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # fashion_mnist | digits (built in) | shards (WebDataset)
    root: str | None = None  # where a built-in dataset's files are (default: the Debian package's path)
    # shards: a split's manifest (or the folder holding it), a brace pattern, or a list of shard paths
    train: Any = None  # the training set (str or list of str)
    # several training sets mixed by weight: [{train: SPEC, weight: 0.7}, ...], SPEC as data.train or a
    # built-in set's name; each global batch draws from them in proportion (replaces data.train)
    mixture: Any = None
    val: Any = None  # a labelled evaluation set (str or list of str)
    num_workers: int = 8  # shards: DataLoader workers per rank (decode + crops)
    # auto: indexed for local plain-tar shards and built-in sets (the world-size-free order), stream
    # for pipe:, URLs and .tar.zst | indexed | stream (rank-split shard streaming, shuffle buffer)
    order: str = "auto"
    shuffle_shards: int = 64  # indexed: shards whose samples are shuffled together (a block)
    shuffle_buffer: int = 1000  # stream: samples per worker mixed before batching


@dataclass
class LossConfig:
    lam: float = 0.05
    num_slices: int = 1024
    t_max: float = 3.0
    knots: int = 17
    integration: str = "half"  # half: [0, t_max] doubled; symmetric: the paper's [-t_max, t_max]
    unbiased: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-4  # absolute, for the global batch; not rescaled with batch size
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    final_lr_ratio: float = 1e-3  # cosine decays to lr * final_lr_ratio
    clip_grad: float = 0.0  # clip the global gradient norm to this (0: off; LeJEPA needs none)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # per rank and forward pass (with global_batch_size: the most one takes)
    global_batch_size: int = 0  # samples per step on all ranks together, whatever the world size (0: off)
    grad_accum_steps: int = 1  # micro-batches of batch_size per step and rank (exact accumulation)
    precision: str = "bf16"  # bf16 | fp32; bf16 autocast is used only where the device supports it
    device: str = "auto"  # auto | cpu | cuda
    online_probe: bool = True  # linear probe on detached backbone features when labels exist
    log_every: int = 10
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf gradients (updates skipped) before stopping
    control_every: int = 10  # steps between the ranks' agreements on preemption and time-based saves
    hang_timeout: float = 1800.0  # s without a completed step: log where it waits, exit 4 (0: off)
    sync_debug: bool = False  # CUDA: error on any host sync in a step that does not log


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: no checkpoints and no model.pt (benchmarks, smoke runs; no resume)
    every_steps: int = 1000  # 0: never by step count
    every_minutes: float = 30.0  # 0: never by time
    keep_last: int = 2  # complete checkpoints kept (>= 2)
    keep_every: int = 0  # also keep every N-th step for good (0: none)
    async_save: bool = True  # training continues while the previous save is written
    load_from: str | None = None  # a fresh run starts from this run dir or step dir (ignored on resume)
    load_model_only: bool = True  # load_from: weights only (any world size), or everything (same world size)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP: model replicas, e.g. one per node (1: FSDP over all ranks)
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype (params follow train.precision)
    activation_checkpointing: str = "none"  # none | full | selective (every ac_every-th block) | op
    ac_every: int = 2
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3) or keep (ZeRO-2)
    timeout: float = 30.0  # minutes a collective may wait before it fails (init_process_group's timeout)
    float8: bool = False  # float8 matmuls in the blocks' Linears (torchao; GPUs of capability 8.9+)
    float8_recipe: str = "tensorwise"  # tensorwise (with float8 FSDP all-gathers) | rowwise
    float8_all_gather: bool | None = None  # tensorwise: FSDP gathers weights in float8 (None: on GPUs)


@dataclass
class ProfileConfig:
    enabled: bool = False  # chrome traces of real steps in <run.dir>/profile/step-N/rank-R.json
    every: int = 100  # a trace every this many steps
    warmup: int = 3  # profiled but discarded steps before each trace
    active: int = 1  # steps in each trace


@dataclass
class LogConfig:
    wandb: str = (
        "auto"  # auto (WANDB_MODE, else online with an API key, else offline) | online | offline | disabled
    )
    project: str = "lejepa"
    entity: str | None = None
    health_every: int = 100  # steps between embedding-health checks (SIGReg per view, rank, std)
    alpha: float = 0.4  # scaled_loss = loss / lam**alpha, the paper's label-free model-selection signal
    sample_keys: bool = False  # <run.dir>/samples/rank<R>.jsonl: the keys of every step's samples


@dataclass
class DemoConfig:
    """The demo's frozen-feature probe (`python -m lejepa_scale.demo`; `evaluate` takes flags)."""

    probe_train_size: int = 10000  # labelled images the frozen-feature probe trains on (0: all)
    probe_test_size: int = 0  # 0: the whole test split
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    batch_size: int = 512
    probe_size: int = 0  # the side features are probed at (0: native; pixels are probed at native size)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def _validate(cfg: Config) -> None:
    checks = [
        (0.0 <= cfg.loss.lam <= 1.0, "loss.lam", f"must be in [0, 1], got {cfg.loss.lam}"),
        (
            cfg.data.source in (*BUILTIN, "shards"),
            "data.source",
            "must be fashion_mnist, digits or shards",
        ),
        (
            cfg.data.source != "shards" or cfg.data.train or cfg.data.mixture,
            "data.train",
            "must name the shards when data.source=shards",
        ),
        (
            not (cfg.model.init_from and cfg.checkpoint.load_from),
            "model.init_from",
            "and checkpoint.load_from both say where the weights start: give one of them",
        ),
        (
            not (cfg.data.mixture and cfg.data.train),
            "data.mixture",
            "replaces data.train: give one of them",
        ),
        (
            cfg.data.mixture is None
            or (
                isinstance(cfg.data.mixture, list)
                and len(cfg.data.mixture) >= 1
                and all(
                    isinstance(m, dict)
                    and m.keys() <= {"train", "weight", "name"}
                    and m.get("train")
                    and isinstance(m.get("weight", 1.0), int | float)
                    and m.get("weight", 1.0) > 0
                    for m in cfg.data.mixture
                )  # fmt: skip
            ),
            "data.mixture",
            "must be a list of {train: SHARDS_OR_BUILT_IN_SET, weight: W > 0} (optionally name: NAME)",
        ),
        (
            cfg.data.source == "shards" or not cfg.data.train,
            "data.source",
            f"is {cfg.data.source!r}, a built-in dataset, but data.train names shards: set "
            "data.source=shards to train on them (or drop data.train)",
        ),
        *(
            (
                spec is None or isinstance(spec, str) or all(isinstance(p, str) for p in spec),
                key,
                "must be a manifest, folder or brace pattern (a string), or a list of shard paths",
            )
            for key, spec in (("data.train", cfg.data.train), ("data.val", cfg.data.val))
        ),  # fmt: skip
        (cfg.loss.integration in ("half", "symmetric"), "loss.integration", "must be 'half' or 'symmetric'"),
        (cfg.loss.knots >= 2, "loss.knots", "must be >= 2"),
        (cfg.loss.num_slices >= 1, "loss.num_slices", "must be >= 1"),
        (cfg.train.precision in ("bf16", "fp32"), "train.precision", "must be 'bf16' or 'fp32'"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be 'auto', 'cpu' or 'cuda'"),
        (cfg.train.steps >= 1, "train.steps", "must be >= 1"),
        (cfg.train.batch_size >= 2, "train.batch_size", "must be >= 2 (SIGReg and BatchNorm need a batch)"),
        (cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1"),
        (
            cfg.train.global_batch_size >= 0,
            "train.global_batch_size",
            "must be >= 0 (0: batch_size per rank)",
        ),
        (
            not (cfg.train.global_batch_size and cfg.train.grad_accum_steps > 1),
            "train.grad_accum_steps",
            "must stay 1 with train.global_batch_size: the micro-batches follow from the global batch and "
            "train.batch_size (the most one forward pass takes)",
        ),
        (cfg.data.order in ("auto", "indexed", "stream"), "data.order", "must be auto, indexed or stream"),
        (cfg.data.shuffle_shards >= 1, "data.shuffle_shards", "must be >= 1"),
        (cfg.checkpoint.keep_last >= 2, "checkpoint.keep_last", "must be >= 2 (the newest may be in flight)"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1"),
        (cfg.parallel.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1"),
        (cfg.parallel.reduce_dtype in ("bf16", "fp32"), "parallel.reduce_dtype", "must be 'bf16' or 'fp32'"),
        (
            cfg.parallel.activation_checkpointing in ("none", "full", "selective", "op"),
            "parallel.activation_checkpointing",
            "must be none, full, selective (every ac_every-th block) or op (torchtitan's op-level SAC)",
        ),
        (cfg.optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0: no clipping)"),
        (
            cfg.parallel.float8_recipe in ("tensorwise", "rowwise"),
            "parallel.float8_recipe",
            "must be tensorwise or rowwise",
        ),
        (cfg.train.control_every >= 1, "train.control_every", "must be >= 1"),
        (cfg.train.hang_timeout >= 0, "train.hang_timeout", "must be >= 0 seconds (0: no watchdog)"),
        (
            cfg.profile.every >= cfg.profile.warmup + cfg.profile.active,
            "profile.every",
            "must be >= profile.warmup + profile.active",
        ),
        (cfg.parallel.ac_every >= 1, "parallel.ac_every", "must be >= 1"),
        (cfg.parallel.timeout > 0, "parallel.timeout", "must be > 0 (minutes)"),
        (cfg.views.n_global >= 1, "views.n_global", "must be >= 1 (the centres come from global views)"),
        (cfg.views.n_local >= 0, "views.n_local", "must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr", "must be > 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (
            cfg.log.wandb in ("auto", "online", "offline", "disabled"),
            "log.wandb",
            "must be auto, online, offline or disabled",
        ),
        (cfg.log.health_every >= 1, "log.health_every", "must be >= 1"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise ConfigError(f"{key} {what}")


# Keys that moved, old -> new: a recipe or override still using an old key fails with the new name;
# configs saved by older runs (run dirs, checkpoints) are read with their keys moved.
MOVED = {
    **{
        f"views.{name}": f"views.photometric.{name}"
        for name in (
            "jitter_p",
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "grayscale_p",
            "blur_p",
            "solarize_p",
        )  # fmt: skip
    },
    **{f"train.{name}": f"parallel.{name}" for name in ("float8", "float8_recipe", "float8_all_gather")},
    **{
        f"eval.{name}": f"demo.{name}"
        for name in ("probe_train_size", "probe_test_size", "probe_epochs", "probe_lr", "batch_size")
    },
}


def _moved_keys(keys: list[str]) -> None:
    moved = [f"{k} is now {MOVED[k]}" for k in keys if k in MOVED]
    if moved:
        raise ConfigError("renamed config keys: " + "; ".join(moved))


def _flat_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, f"{name}.") if isinstance(value, DictConfig) else [name]
    return keys


def _apply_overrides(merged: DictConfig, overrides: list[str]) -> DictConfig:
    """Dotted overrides in order. A dict value replaces a dict-typed key (`model.backbone_kwargs={}`
    clears the recipe's kwargs, as `=null` does) instead of merging into it."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        _moved_keys([key])
        parsed = OmegaConf.from_dotlist([override])
        _check_tuple_lengths(Config, parsed)
        current, value = OmegaConf.select(merged, key), OmegaConf.select(parsed, key)
        free_dict = isinstance(current, DictConfig) and OmegaConf.get_type(current) is dict
        if free_dict and (value is None or isinstance(value, DictConfig)):
            OmegaConf.update(merged, key, value if value is not None else {}, merge=False)
        else:
            merged = OmegaConf.merge(merged, parsed)
    return merged


def _check_tuple_lengths(schema: type, node: DictConfig, prefix: str = "") -> None:
    """Fixed-length tuples (`views.global_scale`, ...) checked by name: OmegaConf reports a wrong
    length without the key."""
    for name, hint in get_type_hints(schema).items():
        key, value, size = f"{prefix}{name}", node.get(name), len(get_args(hint))
        if is_dataclass(hint) and isinstance(value, DictConfig):
            _check_tuple_lengths(hint, value, f"{key}.")
        elif get_origin(hint) is tuple and isinstance(value, ListConfig) and len(value) != size:
            raise ConfigError(
                f"config key {key!r}: takes {size} values, got {len(value)} ({OmegaConf.to_container(value)})"
            )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML recipe at `path` <- dotted `key=value` overrides, validated."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            recipe = OmegaConf.load(path)
            _moved_keys(_flat_keys(recipe))
            _check_tuple_lengths(Config, recipe)
            merged = OmegaConf.merge(merged, recipe)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        merged = _apply_overrides(merged, list(overrides))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required config keys are not set: {', '.join(missing)} (e.g. run.dir=runs/x)")
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        what = str(getattr(e, "msg", e)).split("\n")[0]
        raise ConfigError(f"config key {key!r}: {what}" if key else what) from e
    _validate(cfg)
    return cfg


def from_yaml(text: str) -> Config:
    """A config saved by `to_yaml` (in a run dir or checkpoint), validated against today's schema;
    keys that have moved since it was saved are moved."""
    saved = OmegaConf.create(text)
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(saved.get(section), DictConfig) and key in saved[section]:
            OmegaConf.update(saved, new, saved[section][key])
            del saved[section][key]
            if not saved[section] and section not in Config.__dataclass_fields__:  # a section that moved
                del saved[section]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(f"saved config does not match the schema: {e}".split("\n")[0]) from e


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


@dataclass(frozen=True)
class Batches:
    """How a step's samples split at one world size: `accumulation` micro-batches of `micro` per
    rank and step."""

    micro: int
    accumulation: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.micro * self.accumulation

    @property
    def global_size(self) -> int:
        return self.per_rank * self.world_size


def batches(cfg: Config, world_size: int) -> Batches:
    """The micro-batches of `cfg` at `world_size`. Without train.global_batch_size: batch_size per
    rank, grad_accum_steps of them. With it: each rank takes global / world_size samples per step
    (a world size that does not divide it is refused, naming those that do), in as few
    micro-batches of at most batch_size as divide that share."""
    t = cfg.train
    if not t.global_batch_size:
        return Batches(t.batch_size, t.grad_accum_steps, world_size)
    if t.global_batch_size % world_size:
        divisors = [n for n in range(1, t.global_batch_size + 1) if t.global_batch_size % n == 0]
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} does not split over {world_size} ranks: the "
            f"world sizes that divide it are {', '.join(map(str, divisors))}"
        )
    share = t.global_batch_size // world_size
    accumulation = next(k for k in range(1, share + 1) if share % k == 0 and share // k <= t.batch_size)
    return Batches(share // accumulation, accumulation, world_size)
