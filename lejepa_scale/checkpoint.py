"""Checkpoints that keep preempted multi-day runs going: sharded, asynchronous, atomic, safe to load.

Layout: `<run>/checkpoints/step-00001000/` holds the torch.distributed.checkpoint (DCP) shards of
the model, the optimizer, the online probe and the LR schedule (tensors only), `rank-<r>.json`
per rank (data-loader position, RNG states) and `meta.json` (step, world size, wandb run id,
resolved config). It is written as `step-00001000.tmp/` and renamed by rank 0 only after every
rank has finished writing, so a directory without `.tmp` is complete by construction; a `.tmp`
left by a killed job is never loaded and is removed at the next start.

Loading never unpickles arbitrary objects: DCP's metadata file is read with an unpickler that
accepts only DCP's own metadata classes, and non-tensor entries (optimizer hyperparameters, the LR
schedule) are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import random
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 3  # the trainer saved and stopped on SIGTERM/SIGUSR1/SIGUSR2: requeue and resume
STEP_DIR = re.compile(r"^step-(\d{8})$")


class Preempted(Exception):
    """Raised after the preemption checkpoint is complete; the entry point exits EXIT_PREEMPTED, and
    the SLURM launcher requeues when `signum` is its preemption signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# Safe reading of DCP metadata
# ---------------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes DCP's metadata is made of: anything else (e.g. os.system) is refused."""

    ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata", "collections"}
    ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeReader(FileSystemReader):
    """A DCP FileSystemReader whose metadata unpickling accepts only DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{path}: not a loadable checkpoint ({e}); it may be tampered with or corrupt"
            ) from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries are loaded with weights_only semantics (primitives and containers only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn}: refused to unpickle ({e})"
            ) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_tensors(path: Path, template: dict, group=None) -> None:
    """dcp.load into `template` (in place) with safe reading; any refusal is a CheckpointError."""
    try:
        dcp.load(template, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), process_group=group)
    except CheckpointException as e:
        raise CheckpointError(f"{path}: cannot load: {str(e).splitlines()[-1]}") from e


class BackgroundStager(AsyncStager):
    """DCP's own copy of the state to fresh CPU memory, run in a background thread, so the loop
    only waits for it right before it next mutates parameters or optimizer state (optimizer.step)."""

    _synchronize_after_execute = False

    def __init__(self):
        self._copy = DefaultStager(StagingOptions(False, False, False, False))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-staging")

    def stage(self, state_dict):
        return self._pool.submit(self._copy.stage, state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._copy.close()


# ---------------------------------------------------------------------------------------------------
# Per-rank state that is not a tensor in the model/optimizer: JSON, never pickle
# ---------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
        "generators": {k: _b64(g.get_state()) for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    for name, g in generators.items():
        g.set_state(
            _unb64(state["generators"][name]).to(g.device)
            if g.device.type != "cpu"
            else _unb64(state["generators"][name])
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ---------------------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a resume needs, by reference; the checkpointer reads and fills it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # has state_dict() / load_state_dict()
    generators: dict[str, torch.Generator]
    probe: torch.nn.Module | None = None
    run_meta: dict | None = None  # wandb run id, resolved config, ...

    def tensors(self, *, snapshot: bool = False) -> dict[str, Any]:
        """The state as DCP takes it, by reference. With `snapshot`, the parts that change before the
        next optimizer step (BatchNorm buffers in the next forward, the online probe) are copied now,
        so a background copy of the rest stays consistent."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if snapshot:
            buffers = {name for name, _ in self.model.named_buffers()}
            buffers |= {
                n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") for n in buffers
            }
            model_sd = {k: v.clone() if k in buffers else v for k, v in model_sd.items()}
        out = {"model": model_sd, "optim": optim_sd, "schedule": self.scheduler.state_dict()}
        if self.probe is not None:
            probe_sd, probe_optim_sd = get_state_dict(self.probe.head, self.probe.optimizer)
            if snapshot:
                probe_sd = {k: v.clone() for k, v in probe_sd.items()}
                probe_optim_sd = _clone_tensors(probe_optim_sd)
            out["probe"] = {"model": probe_sd, "optim": probe_optim_sd}
        return out


def _clone_tensors(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone_tensors(v) for v in tree]
    return tree


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_CONTROL_GROUP = None


def _all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank, through a CPU (gloo) group of its own: works beside NCCL
    and never interleaves with the collectives of a checkpoint being written in the background."""
    global _CONTROL_GROUP
    if not dist.is_initialized():
        return flag
    if _CONTROL_GROUP is None:  # created in lockstep: every rank reaches its first call together
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t, group=_CONTROL_GROUP)
    return int(t.item()) == 0


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete step directories under `folder` (`<run>/checkpoints`), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


class Checkpointer:
    """Saves every `every_steps` steps and every `every_minutes` minutes (asynchronously when
    `async_save`, at most one save in flight), finalises a save atomically once every rank has
    written it, keeps the newest `keep_last` (plus every `keep_every`-th step), and resumes."""

    def __init__(
        self,
        folder: Path,
        *,
        every_steps: int,
        every_minutes: float,
        keep_last: int = 2,
        keep_every: int = 0,
        async_save: bool = True,
    ):
        if keep_last < 2:
            raise ValueError("checkpoint.keep_last must be >= 2 (the newest may still be in flight)")
        self.folder = Path(folder)
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.rank = _rank()
        # DCP's background writes run their own collectives: keep them off the training group
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.in_flight: tuple[int, Any] | None = None
        self.staging: Any = None  # future of the background copy of the in-flight save
        self.stager = BackgroundStager() if async_save else None
        self.last_save_time = time.monotonic()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.folder.glob("step-*.tmp"):
                log.warning("removing incomplete checkpoint %s (its job stopped while writing it)", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        _barrier()

    # -- discovery --------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.folder)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    # -- saving ------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether to save after `step`. The step rule is the same on every rank; clocks are not, so
        the time rule is agreed by all ranks (one tiny all-reduce, only when it is enabled)."""
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        if self.every_minutes <= 0:
            return False
        return not _all_true(time.monotonic() - self.last_save_time < 60 * self.every_minutes)

    def save(self, step: int, state: TrainState, *, blocking: bool = False) -> None:
        self.finish()  # at most one save in flight
        local = [p.to_local() if hasattr(p, "to_local") else p for p in state.model.parameters()]
        if not _all_true(all(bool(torch.isfinite(p).all()) for p in local)):
            raise CheckpointError(f"refusing to save non-finite weights at step {step}")
        tmp = self.folder / f"step-{step:08d}.tmp"
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        _barrier()
        (tmp / f"rank-{self.rank:05d}.json").write_text(
            json.dumps(
                {
                    "loader": state.loader.state_dict(),
                    "rng": rng_state(state.generators),
                }
            )
        )
        if self.rank == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / "meta.json").write_text(
                json.dumps({"step": step, "world_size": world, **(state.run_meta or {})})
            )
        if blocking or not self.async_save:
            dcp.save(state.tensors(), checkpoint_id=tmp, process_group=self.group)
            self.in_flight = (step, None)
            self.finish()
        else:
            response = dcp.async_save(
                state.tensors(snapshot=True),
                checkpoint_id=tmp,
                process_group=self.group,
                async_stager=self.stager,
            )
            self.staging = response.staging_completion
            self.in_flight = (step, response.upload_completion)
        self.last_save_time = time.monotonic()

    def wait_for_staging(self) -> None:
        """Block until the in-flight save has copied the state: call before optimizer.step."""
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def poll(self) -> None:
        """Finalise the in-flight save if every rank has finished writing it (cheap; call each step)."""
        if self.in_flight is not None and _all_true(self.in_flight[1] is None or self.in_flight[1].done()):
            self.finish()

    def finish(self) -> None:
        """Wait for the in-flight save, then mark it complete (rename) and apply retention."""
        if self.in_flight is None:
            return
        step, future = self.in_flight
        if future is not None:
            future.result()
        self.staging = None
        _barrier()
        if self.rank == 0:
            (self.folder / f"step-{step:08d}.tmp").rename(self.folder / f"step-{step:08d}")
            self._retain()
        _barrier()
        self.in_flight = None

    def _retain(self) -> None:
        done = self.complete()
        for path in done[: -self.keep_last]:
            step = checkpoint_step(path)
            if not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------

    def _restart_epoch(self, path: Path, meta: dict, world: int, state: TrainState) -> None:
        """Another world size: data positions and RNG streams do not map across rank counts, so the
        interrupted epoch starts again from its beginning, and RNG streams are reseeded per rank."""
        saved = json.loads((path / "rank-00000.json").read_text())["loader"]
        epoch, done = int(saved["epoch"]), int(saved["batch"])
        state.loader.load_state_dict({**state.loader.state_dict(), "epoch": epoch, "batch": 0})
        seed = int(meta["step"]) * 1000 + self.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        for g in state.generators.values():
            g.manual_seed(seed)
        if self.rank == 0:
            log.warning(
                "%s was written by %d ranks and this job has %d: model and optimizer are resharded exactly, "
                "but the data position cannot be carried over. Epoch %d restarts from its first batch: the "
                "%d samples it had already used (%d batches x %d ranks) are seen again, and the per-rank "
                "random streams are reseeded.",
                path,
                meta["world_size"],
                world,
                epoch,
                done * meta["world_size"] * getattr(state.loader, "batch_size", 0),
                done,
                meta["world_size"],
            )

    def load(self, path: Path, state: TrainState) -> int:
        """Restore everything from a complete checkpoint; returns the step to continue from."""
        meta = json.loads((path / "meta.json").read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        tensors = state.tensors()
        load_tensors(path, tensors, self.group)  # DCP reshards model and optimizer to this world size
        set_state_dict(
            state.model, state.optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"]
        )
        state.scheduler.load_state_dict(tensors["schedule"])
        if state.probe is not None:
            set_state_dict(
                state.probe.head,
                state.probe.optimizer,
                model_state_dict=tensors["probe"]["model"],
                optim_state_dict=tensors["probe"]["optim"],
            )
        if meta["world_size"] == world:
            per_rank = json.loads((path / f"rank-{self.rank:05d}.json").read_text())
            state.loader.load_state_dict(per_rank["loader"])
            set_rng_state(per_rank["rng"], state.generators)
        else:
            self._restart_epoch(path, meta, world, state)
        if state.run_meta is not None:
            state.run_meta.update({k: v for k, v in meta.items() if k not in ("step", "world_size")})
        log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (its newest complete checkpoint), a checkpoints folder, or one step dir."""
    path = Path(path)
    if STEP_DIR.match(path.name) and (path / "meta.json").exists():
        return path
    for folder in (path / "checkpoints", path):
        done = complete_checkpoints(folder)
        if done:
            return done[-1]
    raise CheckpointError(f"no complete checkpoint under {path} (looked for checkpoints/step-NNNNNNNN/)")


def load_model_weights(path: Path, model: torch.nn.Module, group=None) -> None:
    """Only the model from a checkpoint, resharded to this job's layout (any world size)."""
    template = {"model": get_model_state_dict(model)}
    load_tensors(path, template, group)
    set_model_state_dict(model, template["model"])


def export_backbone(path: str | Path, out: Path) -> Path:
    """Write the backbone of a checkpoint as one safetensors file that timm loads directly."""
    from safetensors.torch import save_file

    from lejepa_scale.config import from_yaml
    from lejepa_scale.train import build_model

    step_dir = resolve_checkpoint(path)
    cfg = from_yaml(json.loads((step_dir / "meta.json").read_text())["config"])
    model = build_model(cfg)
    load_model_weights(step_dir, model)
    weights = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(
        weights,
        str(out),
        metadata={
            "timm_model": cfg.model.name,
            "timm_kwargs": json.dumps({**dict(cfg.model.backbone_kwargs), "img_size": cfg.views.global_size}),
            "checkpoint": str(step_dir),
        },
    )
    return step_dir


class PreemptionFlag:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM sends before preemption or the time limit) only set
    a flag; the trainer checks it at step boundaries, all ranks together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        return not _all_true(self.received is None)


def main(argv: list[str] | None = None) -> None:
    """`python -m lejepa_scale.checkpoint export RUN_DIR --out FILE`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lejepa_scale.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="consolidated backbone weights (safetensors) for timm")
    export.add_argument("checkpoint", help="run dir (newest complete checkpoint) or a step dir")
    export.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    step_dir = export_backbone(args.checkpoint, args.out)
    print(
        f"wrote {args.out} from {step_dir}; load it with timm.create_model(name, num_classes=0, ...) "
        "and safetensors.torch.load_file (model name and kwargs are in the file's metadata)"
    )


if __name__ == "__main__":
    main()
