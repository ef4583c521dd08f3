import logging

import pytest
import torch

from data_pipeline.builtin import load_builtin, read_idx


def test_missing_fashion_mnist_falls_back_to_digits_with_a_clear_message(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_builtin("fashion_mnist", root=str(tmp_path))
    assert data.name == "digits" and data.num_classes == 10
    assert "dataset-fashion-mnist" in caplog.text and "digits" in caplog.text
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (1, 8, 8)
    assert len(data.train_images) + len(data.test_images) == 1797


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(
        bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100
    )
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
