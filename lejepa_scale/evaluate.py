"""`python -m lejepa_scale.evaluate --checkpoint RUN_DIR_OR_STEP --train DATA --val DATA`: frozen features.

Extracts backbone features (never the projector's) from labelled data, then trains a linear probe
(LayerNorm + Linear, AdamW, cosine) and/or runs a weighted k-NN (k = 20, cosine similarity,
temperature 0.07), and reports top-1/top-5 as a table and as JSON (`<run>/eval.json` by default,
which `python -m lejepa_scale.report` reads). DATA is a built-in dataset (`fashion_mnist`, `digits`:
train split for --train, test split for --val), labelled shards (a split's manifest, the folder
holding it, a brace pattern) or a folder with one subfolder per class (unreadable files are skipped,
counted and named). Under
`torchrun --nproc_per_node N` every rank extracts its share of the images and rank 0 probes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from data_pipeline.labelled import labelled_images, seeded_subset
from data_pipeline.views import normalize
from lejepa_scale.checkpointing.safe_loading import CheckpointError
from lejepa_scale.distributed.process_groups import init_distributed
from lejepa_scale.evaluation.features import extract, feature_fn
from lejepa_scale.evaluation.probes import few_shot, knn_classify, linear_probe
from lejepa_scale.logging_setup import configure_logging
from lejepa_scale.pretrained import load_run

log = logging.getLogger("lejepa_scale.evaluate")


def evaluate(args: argparse.Namespace) -> dict | None:
    env = init_distributed(args.device)
    model, cfg, step_dir = load_run(args.checkpoint, args.random_init)
    backbone = model.backbone.to(env.device)
    encode, feature = feature_fn(backbone, args.feature)
    size = args.image_size or cfg.views.global_size
    mean, std = cfg.views.mean, cfg.views.std
    t0 = time.perf_counter()
    train_data = labelled_images(args.train, "train", size, env.rank, env.world_size, args.max_train)
    prepare = lambda images: normalize(images, mean, std)  # noqa: E731
    train = extract(encode, train_data, env.device, prepare)
    val_data = labelled_images(args.val, "val", size, env.rank, env.world_size, args.max_val)
    val = extract(encode, val_data, env.device, prepare)
    if not env.is_main:
        return None
    (train_x, train_y), (val_x, val_y) = train, val
    if 0 < args.max_train < len(train_x):  # shards: subsampled after extraction
        keep = seeded_subset(len(train_x), args.max_train)
        train_x, train_y = train_x[keep], train_y[keep]
    if args.shots:
        train_x, train_y = few_shot(train_x, train_y, args.shots)
    log.info("features: %s train, %s val, dim %d (%.0f s)", len(train_x), len(val_x), train_x.shape[1],
             time.perf_counter() - t0)  # fmt: skip
    results = {}
    if args.probe in ("linear", "both"):
        results["linear"] = asdict(
            linear_probe(
                train_x,
                train_y,
                val_x,
                val_y,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=256,
                warmup_epochs=args.warmup_epochs,
            )  # fmt: skip
        )
    if args.probe in ("knn", "both"):
        results["knn"] = asdict(
            knn_classify(train_x, train_y, val_x, val_y, k=args.k, temperature=args.temperature)
        )
    return {
        "checkpoint": str(step_dir),
        "weights": "random_init" if args.random_init else "pretrained",
        "feature": feature,
        "probe": {
            "head": "LayerNorm + Linear",
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": 1e-6,
            "epochs": args.epochs,
            "warmup_epochs": args.warmup_epochs,
            "schedule": "linear warm-up, cosine",
        },
        "train": args.train,
        "val": args.val,
        "train_images": len(train_x),
        "val_images": len(val_x),
        "shots": args.shots,
        **results,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lejepa_scale.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir (newest complete checkpoint) or step dir")
    data = (
        "a built-in set (fashion_mnist, digits), labelled shards (a split's manifest-<split>.json, "
        "the folder holding it, or a brace pattern) or a folder with one subfolder per class"
    )
    p.add_argument("--train", required=True, help=f"labelled data the probes train on: {data}")
    p.add_argument("--val", required=True, help="labelled data the probes are scored on, as --train")
    p.add_argument("--probe", choices=("linear", "knn", "both"), default="both")
    p.add_argument(
        "--feature",
        choices=("cls", "cls2", "mean"),
        default="cls2",
        help="cls2 (official): CLS of the last two layers; cls: last layer's CLS; mean: of patch tokens",
    )
    p.add_argument("--shots", type=int, default=0, help="few-shot: K labelled training images per class")
    p.add_argument("--max-train", type=int, default=0, help="a seeded subset of the training images (0: all)")
    p.add_argument("--max-val", type=int, default=0, help="a seeded subset of the evaluation images (0: all)")
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    p.add_argument(
        "--warmup-epochs", type=int, help="linear probe warm-up (then cosine); default: epochs / 10"
    )
    p.add_argument("--lr", type=float, default=1e-2, help="linear probe AdamW lr")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image-size", type=int, default=0, help="default: the run's global crop size")
    p.add_argument("--random-init", action="store_true", help="the same architecture, untrained (a baseline)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="JSON results (default: <run dir>/eval.json)")
    args = p.parse_args(argv)
    if args.warmup_epochs is None:
        args.warmup_epochs = args.epochs // 10
    configure_logging()
    try:
        report = evaluate(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if report is None:
        return
    out = args.out or Path(report["checkpoint"]).parent.parent / (
        "eval_random_init.json" if args.random_init else "eval.json"
    )
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['weights']} {report['feature']} features of {report['checkpoint']}")
    sizes = f"({report['train_images']} train, {report['val_images']} val images)"
    print(f"{'probe':<8} {'top-1':>7} {'top-5':>7}   {sizes}")
    for name in ("linear", "knn"):
        if name in report:
            print(f"{name:<8} {100 * report[name]['top1']:>6.2f}% {100 * report[name]['top5']:>6.2f}%")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
