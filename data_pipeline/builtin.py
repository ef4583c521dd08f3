"""Small labelled image sets for the CPU demo: Fashion-MNIST and scikit-learn's digits.

Fashion-MNIST's idx files are looked for in Debian's `dataset-fashion-mnist`, then in this user's
cache (`~/.cache/lejepa_scale`, or under XDG_CACHE_HOME), then downloaded there with torchvision's
downloader (its mirrors, md5-checked); scikit-learn's bundled digits are the fallback when all
three fail, and one line says which data is used and why.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
BUILTIN = ("fashion_mnist", "digits")
_IDX_DTYPES = {0x08: np.uint8}


@dataclass
class LabelledImages:
    """uint8 images (N, C, H, W) and int64 labels (N,), split into train and test."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.train_labels.max()) + 1


def read_idx(path: Path) -> np.ndarray:
    """Read an (optionally gzipped) idx file, the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values (truncated file?)")
    return array.reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> LabelledImages:
    root = Path(root)

    def part(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(next(iter(sorted(root.glob(f"{prefix}-images-idx3-ubyte*")))))
        labels = read_idx(next(iter(sorted(root.glob(f"{prefix}-labels-idx1-ubyte*")))))
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    return LabelledImages("fashion_mnist", *part("train"), *part("t10k"))


def load_digits(test_fraction: float = 1 / 3, seed: int = 0) -> LabelledImages:
    """scikit-learn's 1,797 8x8 digits (values 0..16), scaled to uint8 and split with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = torch.from_numpy((data.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return LabelledImages("digits", images[train], labels[train], images[test], labels[test])


def cache_dir() -> Path:
    """Where downloaded datasets are kept: $XDG_CACHE_HOME/lejepa_scale, else ~/.cache/lejepa_scale."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lejepa_scale"


def _has_fashion_mnist(folder: Path) -> bool:
    return any(folder.glob("train-images-idx3-ubyte*")) and any(folder.glob("t10k-labels-idx1-ubyte*"))


def find_fashion_mnist(root: str | None = None) -> tuple[Path | None, str]:
    """The folder holding Fashion-MNIST's idx files and where it came from, or None and where it is
    not ("Fashion-MNIST is <that>"): `root` when given; else Debian's package, the cache, a download
    into the cache."""
    if root:
        found = Path(root) if _has_fashion_mnist(Path(root)) else None
        return found, f"data.root {root}" if found else f"not under data.root {root} (no idx files there)"
    if _has_fashion_mnist(Path(FASHION_MNIST_DIR)):
        return Path(FASHION_MNIST_DIR), f"Debian's dataset-fashion-mnist ({FASHION_MNIST_DIR})"
    cached = cache_dir() / "FashionMNIST" / "raw"
    if _has_fashion_mnist(cached):
        return cached, f"the cache ({cached})"
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(cache_dir(), train=True, download=True)  # both splits, md5-checked, unpacked
    except Exception as e:  # no network, a mirror down, a bad checksum: all say why on one line
        why = " ".join(str(e).split())
        return None, (f"not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist) nor in {cached}, "
                      f"and its download failed ({why})")  # fmt: skip
    return cached, f"a download into the cache ({cached})"


def load_builtin(name: str, root: str | None = None) -> LabelledImages:
    """`fashion_mnist` (found or fetched as `find_fashion_mnist` says; else scikit-learn's digits,
    with a warning that says why) or `digits`."""
    if name == "digits":
        return load_digits()
    if name != "fashion_mnist":
        raise ValueError(f"data.source: unknown built-in dataset {name!r}; use 'fashion_mnist' or 'digits'")
    folder, where = find_fashion_mnist(root)
    if folder is None:
        log.warning("Fashion-MNIST is %s: using scikit-learn's digits instead", where)
        return load_digits()
    log.info("Fashion-MNIST from %s", where)
    return load_fashion_mnist(folder)
