"""The process's random streams as checkpointable state: python, numpy, torch (CPU and CUDA) and
named torch.Generators, stored as JSON-safe values (never pickled)."""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's random streams (drop path, augmentation): distinct on every rank."""
    return seed * 1000 + rank


class RandomState:
    """Every random stream of one rank's process, seeded from one integer (distinct per rank), saved
    and restored exactly."""

    def __init__(self, generators: dict[str, torch.Generator], rank: int = 0):
        self.generators, self.rank = generators, rank

    def seed(self, seed: int) -> None:
        seed = rank_seed(seed, self.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        for g in self.generators.values():
            g.manual_seed(seed)

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": _b64(torch.get_rng_state()),
            "generators": {k: _b64(g.get_state()) for k, g in self.generators.items()},
        }
        if torch.cuda.is_available():
            state["cuda"] = _b64(torch.cuda.get_rng_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_unb64(state["torch"]))
        for name, g in self.generators.items():
            g.set_state(_unb64(state["generators"][name]))  # a CPU ByteTensor, CUDA generators too
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_unb64(state["cuda"]))

    def load_from_other_world(self, saved: dict, world_size: int, step: int) -> None:
        """Streams saved by another rank count do not map to this one's: reseeded from the step."""
        self.seed(step)
