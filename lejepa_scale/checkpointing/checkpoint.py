"""Checkpoints that keep preempted multi-day runs going: sharded, asynchronous, atomic, safe to load.

Storage only: the checkpointer saves and restores anything with `state_dict()` / `load_state_dict()`.
Layout: `<run>/checkpoints/step-00001000/` holds the torch.distributed.checkpoint (DCP) shards of
the states that hold tensors (model, optimizer, LR schedule, online probe), `rank-<r>.json` per rank
(states that differ per rank: data-loader position, RNG streams) and `meta.json` (step, world size,
and what the run adds: wandb run id, resolved config). It is written as `step-00001000.tmp/` and
renamed by rank 0 only after every rank has finished writing, so a directory without `.tmp` is
complete by construction; a `.tmp` left by a killed job is never loaded and is removed at the next
start. Reading is safe (`safe_loading`), the copy to host memory is `staging`'s, what a model and
an optimizer store is `states`', and HSDP replicas share the work through `replicas`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from lejepa_scale.checkpointing.replicas import broadcast_from_first_replica, replica_share
from lejepa_scale.checkpointing.safe_loading import CheckpointError, load_tensors
from lejepa_scale.checkpointing.staging import stager_for
from lejepa_scale.checkpointing.states import ModelState
from lejepa_scale.config import Config, ConfigError, ModelConfig, from_yaml
from lejepa_scale.distributed.collectives import any_rank, from_rank0
from lejepa_scale.distributed.process_groups import new_checkpoint_group, replica_groups

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
# Without a process group DCP warns that it assumes one process: here that is always the intent.
warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to (save|load)")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    """Saves `state` (DCP, sharded) and `per_rank` (JSON, one file per rank) when asked: the trainer
    follows `due` (every `every_steps` steps) and `overdue` (every `every_minutes` minutes, once the
    ranks agree). Asynchronously when `async_save`, at most one save in flight; a save is finalised
    atomically once every rank has written it, keeps the newest `keep_last` (plus
    every `keep_every`-th step), and restores them. `meta` (a dict the caller may keep updating) goes
    into every checkpoint's meta.json."""

    def __init__(
        self,
        folder: Path,
        state: dict[str, Stateful],
        per_rank: dict[str, Stateful],
        meta: dict[str, Any],
        *,
        every_steps: int,
        every_minutes: float,
        keep_last: int = 2,
        keep_every: int = 0,
        async_save: bool = True,
        enabled: bool = True,
        device: torch.device | str = "cpu",
        replica: tuple[int, int] = (0, 1),
        replicate_group=None,
        staging_wait_every_step: bool = False,
    ):
        if keep_last < 2:
            raise ValueError("checkpoint.keep_last must be >= 2 (the newest may still be in flight)")
        self.folder = Path(folder)
        self.state, self.per_rank, self.meta = state, per_rank, meta
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.enabled = enabled  # False: saves nothing, finds nothing
        self.staging_wait_every_step = staging_wait_every_step  # train.sync_debug: the copy's syncs here
        self.rank = _rank()
        # DCP's background writes run their own collectives: keep them off the training group
        self.group = new_checkpoint_group()
        self.in_flight: tuple[int, Any] | None = None
        self.staging: Any = None  # future of the background copy of the in-flight save
        self.device = torch.device(device)
        self.stager = stager_for(self.device) if async_save else None
        self.replica = replica  # (this rank's replica, replicas): HSDP replicas write disjoint shares
        if replica[1] > 1 and replicate_group is None:
            raise ValueError(
                "HSDP checkpoints need the mesh's replicate group (mesh.get_group('dp_replicate'))"
            )
        self.replicate_group = replicate_group  # the mesh's group across replicas (training backend)
        self.read_group, self.host_group = replica_groups(*replica) if replica[1] > 1 else (None, None)
        self.staged_bytes = 0  # tensor bytes this rank copied for its last save
        self.last_save_time = time.monotonic()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.folder.glob("step-*.tmp"):
                log.warning("removing incomplete checkpoint %s (its job stopped while writing it)", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        _barrier()

    # -- discovery --------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, if any, as rank 0 sees it (a collective:
        every rank calls it, and every rank gets the same answer)."""
        done = complete_checkpoints(self.folder) if self.enabled and self.rank == 0 else []
        return from_rank0(done[-1] if done else None)

    # -- saving ------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the step rule asks for a save after `step` (the same answer on every rank)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def overdue(self) -> bool:
        """Whether this rank's clock says the time rule is due; clocks differ, so the trainer acts on
        it only once the ranks agree (at a control step)."""
        return self.every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * self.every_minutes

    def busy(self) -> bool:
        """Whether this rank is still writing the in-flight save (when no rank is, `finish` is quick)."""
        return self.in_flight is not None and self.in_flight[1] is not None and not self.in_flight[1].done()

    def save(self, step: int, *, blocking: bool = False) -> None:
        if not self.enabled:
            return
        self.finish()  # at most one save in flight
        models = [state for state in self.state.values() if isinstance(state, ModelState)]
        if any_rank(not all(model.finite() for model in models))[0]:
            raise CheckpointError(f"refusing to save non-finite weights at step {step}")
        tensors, self.staged_bytes = replica_share(
            {name: state.state_dict() for name, state in self.state.items()}, *self.replica
        )
        tmp = self.folder / f"step-{step:08d}.tmp"
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        _barrier()
        per_rank = {name: state.state_dict() for name, state in self.per_rank.items()}
        (tmp / f"rank-{self.rank:05d}.json").write_text(json.dumps(per_rank))
        if self.rank == 0:
            (tmp / "meta.json").write_text(
                json.dumps({"step": step, "world_size": _world_size(), **self.meta})
            )
        if blocking or not self.async_save:
            dcp.save(tensors, checkpoint_id=tmp, process_group=self.group)
            self.in_flight = (step, None)
            self.finish()
        else:
            if self.device.type == "cuda":  # the staging copy runs on a side stream: after this step's work
                torch.cuda.current_stream(self.device).synchronize()
            response = dcp.async_save(
                tensors, checkpoint_id=tmp, process_group=self.group, async_stager=self.stager
            )
            self.staging = response.staging_completion
            self.in_flight = (step, response.upload_completion)
        self.last_save_time = time.monotonic()

    def after_step(self, step: int, *, last: bool, control: bool, stop_requested: bool) -> bool:
        """The save rules once `step` (counted from 0) has completed: a save when the step rule asks
        (before the agreement, so a preemption right now completes that save instead of writing
        another); at control steps one agreement across ranks on whether any rank was asked to stop
        (then the preemption save: returns True), whether a clock says a save is due (the time
        rule) and whether every rank has written the background save (then it is completed); with
        `staging_wait_every_step`, the wait for the background copy, outside the checked step."""
        saved = not last and self.due(step + 1)
        if saved:
            self.save(step + 1)
        if control:
            stop, overdue, busy = self.agree(stop_requested)
            if not busy:
                self.finish()
            if stop:
                self.save_before_exit(step + 1)
                return True
            if overdue and not (last or saved):
                self.save(step + 1)
        if self.staging_wait_every_step:
            self.wait_for_staging()
        return False

    def agree(self, stop_requested: bool) -> tuple[bool, bool, bool]:
        """One packed collective on the CPU control group: whether any rank was asked to stop,
        whether any rank's clock says the time rule is due, whether any rank still writes the
        background save."""
        return tuple(any_rank(stop_requested, self.overdue(), self.busy()))

    def save_before_exit(self, step: int) -> None:
        """On preemption, within SLURM's KillWait: nothing when a complete checkpoint of `step`
        exists, the in-flight save when it is of `step` (it finishes first), else a blocking save.
        Logs which path it took and how long it took."""
        if not self.enabled:
            return
        start = time.monotonic()
        latest = self.latest()
        if latest is not None and checkpoint_step(latest) == step:
            path = "the checkpoint of this step is complete"
        elif self.in_flight is not None and self.in_flight[0] == step:
            self.finish()
            path = "completed the background save of this step"
        else:
            self.save(step, blocking=True)
            path = "saved"
        if self.rank == 0:
            log.info("preemption at step %d: %s (%.1f s)", step, path, time.monotonic() - start)

    def wait_for_staging(self) -> None:
        """Block until the in-flight save has copied the state: call before optimizer.step."""
        if self.staging is not None:
            self.staging.result()
            self.staging = None

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
        done = complete_checkpoints(self.folder)
        for path in done[: -self.keep_last]:
            step = checkpoint_step(path)
            if not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------

    def resume(self, model: ModelConfig, load_from: str | None = None, load_model_only: bool = True) -> int:
        """Continue from this run's newest complete checkpoint, else start from `load_from` with
        `load_model_only=False` (another run or step dir: its whole state; its weights alone are
        loaded when the model is built), else from scratch; a checkpoint of another model (the keys
        of `model` that `check_same_model` reads) is refused. Returns the first step to run. A
        checkpoint written at another world size is resharded exactly; each per-rank state continues
        as its `load_from_other_world` says."""
        latest = self.latest()
        if latest is not None:
            check_same_model(model, latest)
            meta = self.load(latest)
            self.meta.update({k: v for k, v in meta.items() if k not in ("step", "world_size")})
            return int(meta["step"])
        if not load_from or load_model_only:  # weights only: loaded when the model was built
            return 0
        source = resolve_checkpoint(load_from)  # a new run from another run's whole state
        check_same_model(model, source)
        log.info("initialised from %s (full state)", source)
        return int(self.load(source)["step"])

    def load(self, path: Path) -> dict[str, Any]:
        """Restore `state` from a complete checkpoint (DCP reshards it to this world size) and
        `per_rank`: from this rank's file when the checkpoint was written by as many ranks as this job
        has, else through each state's `load_from_other_world(rank 0's state, saved world size,
        step)`. Returns its meta.json (step, world size, what the run stored)."""
        meta = json.loads((path / "meta.json").read_text())
        if self.replica[1] == 1:
            load_tensors(path, dict(self.state), self.group)
        else:
            self._load_once_and_share(path)
        same_world = meta["world_size"] == _world_size()
        if not same_world and self.rank == 0:
            log.warning("%s was written by %d ranks and this job has %d: model and optimizer are resharded "
                        "exactly", path, meta["world_size"], _world_size())  # fmt: skip
        saved = self.rank_state(path, self.rank if same_world else 0)
        for name, state in self.per_rank.items():
            if same_world:
                state.load_state_dict(saved[name])
            else:
                state.load_from_other_world(saved[name], meta["world_size"], meta["step"])
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta

    def _load_once_and_share(self, path: Path) -> None:
        """Under HSDP: replica 0 reads the checkpoint (DCP, resharded to its ranks) and shares it
        with the other replicas. The file system serves one copy, not R."""
        tree = {name: state.state_dict() for name, state in self.state.items()}
        if self.replica[0] == 0:
            load_tensors(path, tree, self.read_group)
        tree = broadcast_from_first_replica(tree, self.device, self.replicate_group, self.host_group)
        for name, state in self.state.items():
            state.load_state_dict(tree[name])

    @staticmethod
    def rank_state(path: Path, rank: int) -> dict[str, Any]:
        """What rank `rank` stored in checkpoint `path` (its loader position, RNG streams)."""
        return json.loads((Path(path) / f"rank-{rank:05d}.json").read_text())


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


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json: step, world size, and what the run stored (e.g. its config)."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_model_weights(path: Path, model: torch.nn.Module, group=None) -> None:
    """Only the model from a checkpoint, resharded to this job's layout (any world size)."""
    load_tensors(path, {"model": ModelState(model)}, group)


def newest_step(run_dir: Path) -> int:
    """The step a run resumes from (0 for a fresh run)."""
    done = complete_checkpoints(Path(run_dir) / "checkpoints")
    return checkpoint_step(done[-1]) if done else 0


def stored_config(path: Path) -> Config:
    """The config a checkpoint was written with (its meta.json), with keys moved since then."""
    return from_yaml(read_meta(path)["config"])


# The model keys a checkpoint must match to load into a run's model.
MODEL_KEYS = ("name", "backbone_kwargs", "proj_hidden_dim", "proj_dim", "proj_embed_dim", "swa_target")


def check_same_model(model: ModelConfig, step_dir: Path) -> None:
    """A checkpoint holds the model its stored config describes: a different one cannot load into
    this run's model, so say which keys differ instead of listing missing tensors."""
    saved = stored_config(step_dir).model
    differ = [
        f"model.{key} {getattr(saved, key)!r} (checkpoint) vs {getattr(model, key)!r} (requested)"
        for key in MODEL_KEYS
        if getattr(saved, key) != getattr(model, key)
    ]
    if differ:
        raise ConfigError(
            f"{step_dir} holds another model than the config asks for: {'; '.join(differ)}. Resume with "
            "the run's own config (its config.yaml) or start a new run.dir"
        )
