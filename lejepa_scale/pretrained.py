"""A run's backbone for others: load a checkpoint's model (for evaluation, plots, fine-tuning), and
`python -m lejepa_scale.pretrained export RUN --out FILE` writes the backbone as one safetensors file
that timm loads directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lejepa_scale.checkpointing.checkpoint import load_model_weights, resolve_checkpoint, stored_config
from lejepa_scale.checkpointing.safe_loading import CheckpointError
from lejepa_scale.config import Config
from lejepa_scale.method.model import LeJEPAModel
from lejepa_scale.training.build import build_model


def load_run(checkpoint: str | Path, random_init: bool = False) -> tuple[LeJEPAModel, Config, Path]:
    """The model of a checkpoint (a run dir: its newest complete one), built from the config stored
    in it, or the same architecture at its random initialisation; with the config and the step dir."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = stored_config(step_dir)
    model = build_model(cfg)
    if not random_init:
        load_model_weights(step_dir, model)
    return model.eval(), cfg, step_dir


def export_backbone(checkpoint: str | Path, out: Path) -> Path:
    """Write the backbone of a checkpoint as one safetensors file; returns the step dir it came from."""
    from safetensors.torch import save_file

    model, cfg, step_dir = load_run(checkpoint)
    weights = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    size = cfg.views.global_size
    save_file(
        weights,
        str(out),
        metadata={
            "timm_model": cfg.model.name,
            "timm_kwargs": json.dumps(model.backbone.timm_kwargs),
            # what timm's data config reads: the normalisation and input size the run trained with
            "pretrained_cfg": json.dumps(
                {"input_size": [3, size, size], "mean": list(cfg.views.mean), "std": list(cfg.views.std)}
            ),
            "checkpoint": str(step_dir),
        },
    )
    return step_dir


LOADING = """\
import json, timm
from safetensors import safe_open
from safetensors.torch import load_file

with safe_open("{path}", "pt") as f:
    meta = f.metadata()  # timm_model, timm_kwargs and pretrained_cfg (JSON), checkpoint
kwargs = {**json.loads(meta["timm_kwargs"]), "pretrained_cfg_overlay": json.loads(meta["pretrained_cfg"])}
model = timm.create_model(meta["timm_model"], num_classes=0, **kwargs)
model.load_state_dict(load_file("{path}"))
data_config = timm.data.resolve_data_config(model=model)  # the run's mean, std and input size"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lejepa_scale.pretrained",
        description="A run's backbone for others: `export RUN --out FILE.safetensors` writes it for timm.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="consolidated backbone weights (safetensors) for timm")
    export.add_argument("checkpoint", help="run dir (newest complete checkpoint) or a step dir")
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        sys.exit(f"error: --out {args.out}: folder {args.out.parent} does not exist (create it first)")
    try:
        step_dir = export_backbone(args.checkpoint, args.out)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(
        f"wrote {args.out} from {step_dir}; the metadata keys timm_model, timm_kwargs and pretrained_cfg say "
        "how to build it:"
    )
    print(LOADING.replace("{path}", str(args.out)))


if __name__ == "__main__":
    main()
