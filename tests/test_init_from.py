"""A run starting from other weights at a new resolution (a high-resolution phase): a ViT trained on
24 px crops continues on 32 px ones from its checkpoint (`checkpoint.load_from`) and from its
exported backbone (`model.init_from`), with the position embeddings resampled to the new grid."""

from __future__ import annotations

import subprocess
import sys

import torch
from timm.layers import resample_abs_pos_embed

from tests.helpers import ENV, ROOT, TINY, run_train, weights

HIGH = [
    "views.global_size=32",
    "train.steps=1",
    "optim.lr=1e-12",
    "optim.warmup_steps=0",
    "checkpoint.every_steps=0",
]


def test_a_vit_trained_at_24_px_continues_at_32_px_from_its_checkpoint_and_its_export(tmp_path):
    run_train(tmp_path / "low", *TINY, "train.steps=2", "checkpoint.every_steps=0")  # 24 px: 6 x 6 patches
    export = tmp_path / "low.safetensors"
    command = [
        sys.executable,
        "-m",
        "lejepa_scale.pretrained",
        "export",
        str(tmp_path / "low"),
        "--out",
        str(export),
    ]
    subprocess.run(command, check=True, capture_output=True, env=ENV, cwd=ROOT, timeout=300)
    low = weights(tmp_path / "low")
    grid = resample_abs_pos_embed(
        low["backbone.pos_embed"], new_size=[8, 8], old_size=[6, 6], num_prefix_tokens=1
    )
    starts = {"checkpoint": f"checkpoint.load_from={tmp_path / 'low'}", "export": f"model.init_from={export}"}
    for name, start in starts.items():
        result = run_train(tmp_path / name, *TINY, *HIGH, start)
        line = next(line for line in result.stderr.splitlines() if "loaded" in line and "tensors" in line)
        assert "pos_embed (1, 37, 64) -> (1, 65, 64)" in line, line  # 1 + 6 x 6 tokens -> 1 + 8 x 8
        high = weights(tmp_path / name)
        assert high["backbone.pos_embed"].shape == (1, 65, 64)
        assert torch.allclose(high["backbone.pos_embed"], grid, atol=1e-6)
        for key, value in low.items():
            if key.startswith("backbone.blocks.") and value.is_floating_point():
                assert torch.allclose(high[key], value, atol=1e-6), (name, key)
        if name == "export":  # the backbone only: the projector starts from the seed
            assert "as initialised: none" in line and not torch.allclose(
                high["projector.0.weight"], low["projector.0.weight"]
            )
