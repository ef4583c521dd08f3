"""Loading a checkpoint never unpickles arbitrary objects: DCP's metadata file is read with an
unpickler that accepts only DCP's own metadata classes, and non-tensor entries (optimizer
hyperparameters, the LR schedule) are read with torch.load(weights_only=True)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded; the message names the file."""


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


def load_tensors(path: Path, template: dict, group=None, no_dist: bool = False) -> None:
    """dcp.load into `template` (in place) with safe reading; any refusal is a CheckpointError.
    `no_dist`: this process alone reads it, whatever process group runs."""
    try:
        dcp.load(template, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), process_group=group,
                 no_dist=no_dist)  # fmt: skip
    except CheckpointException as e:
        raise CheckpointError(f"{path}: cannot load: {str(e).splitlines()[-1]}") from e


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole model (unsharded, on the CPU) without building the model: the template
    comes from the checkpoint's own metadata, and this process alone reads it (rank 0's reference
    model under torchrun)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeReader(path).read_metadata()
    template = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    nested: dict = {"model": {key.removeprefix("model."): value for key, value in template.items()}}
    load_tensors(path, nested, no_dist=True)
    return nested["model"]
