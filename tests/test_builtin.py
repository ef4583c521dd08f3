import functools
import hashlib
import http.server
import logging
import threading
from pathlib import Path

import pytest
import torch
from torchvision.datasets import FashionMNIST

from data_pipeline import builtin
from data_pipeline.builtin import load_builtin, read_idx

DEBIAN = Path(builtin.FASHION_MNIST_DIR)


@pytest.fixture
def no_debian_package(tmp_path, monkeypatch):
    """A machine without dataset-fashion-mnist, with an empty cache of its own."""
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_without_the_package_or_a_network_the_demo_data_is_digits_and_says_why(no_debian_package, monkeypatch,
                                                                               caplog):  # fmt: skip
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens: no network
    with caplog.at_level(logging.WARNING):
        data = load_builtin("fashion_mnist")
    assert data.name == "digits" and data.num_classes == 10
    (line,) = [r.getMessage() for r in caplog.records if r.name == "data_pipeline.builtin"]
    assert "apt-get install dataset-fashion-mnist" in line and "download failed" in line and "digits" in line
    assert "\n" not in line
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (1, 8, 8)
    assert len(data.train_images) + len(data.test_images) == 1797


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="the local mirror serves the Debian package's files")
def test_fashion_mnist_is_fetched_into_the_cache_checksummed_then_found_there(no_debian_package, monkeypatch,
                                                                              tmp_path, caplog):  # fmt: skip
    """torchvision's downloader against a loopback mirror (the package's .gz files, with their md5s),
    into the cache; the next load reads the cache without the mirror."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DEBIAN))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    sums = [
        (name, hashlib.md5((DEBIAN / name).read_bytes()).hexdigest()) for name, _ in FashionMNIST.resources
    ]
    monkeypatch.setattr(FashionMNIST, "resources", sums)
    try:
        with caplog.at_level(logging.INFO):
            data = load_builtin("fashion_mnist")
    finally:
        server.shutdown()
    assert data.name == "fashion_mnist" and len(data.train_images) == 60000 and len(data.test_images) == 10000
    assert "Fashion-MNIST from a download into the cache" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = load_builtin("fashion_mnist")  # the mirror is gone
    assert torch.equal(again.test_labels, data.test_labels) and "Fashion-MNIST from the cache" in caplog.text


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(
        bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100
    )
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
