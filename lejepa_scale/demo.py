"""`python -m lejepa_scale.demo [key=value ...]`: the CPU demo, end to end.

Pretrains `configs/demo_cpu.yaml` with LeJEPA, then fits the same linear probe on frozen features
of the pretrained backbone, of its random initialisation, and on raw pixels, and prints the three
test accuracies (also written to `<run.dir>/probe.json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.builtin import load_builtin
from data_pipeline.views import normalize
from lejepa_scale.build import build_model
from lejepa_scale.config import Config, load_config
from lejepa_scale.metrics import configure_logging
from lejepa_scale.parallel import init_distributed
from lejepa_scale.probe import extract_features, linear_probe
from lejepa_scale.train import train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
log = logging.getLogger("lejepa_scale.demo")


def probe_backbones(cfg: Config, pretrained: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Linear-probe accuracy of frozen features: pretrained vs random init vs raw pixels."""
    data = load_builtin(cfg.data.source, cfg.data.root)
    n_train = cfg.eval.probe_train_size or len(data.train_images)
    n_test = cfg.eval.probe_test_size or len(data.test_images)
    subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.run.seed))[
        :n_train
    ]
    train_x, train_y = data.train_images[subset], data.train_labels[subset]
    test_x, test_y = data.test_images[:n_test], data.test_labels[:n_test]
    device = init_distributed(cfg.train.device).device

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=cfg.views.global_size, mode="bilinear", antialias=True, align_corners=False)
        return normalize(x, cfg.views.mean, cfg.views.std)

    def probe(encode, name: str, prep=prepare) -> dict[str, float]:
        t0 = time.perf_counter()
        feats = [
            extract_features(encode, x, batch_size=cfg.eval.batch_size, device=device, prepare=prep)
            for x in (train_x, test_x)
        ]
        result = linear_probe(
            feats[0],
            train_y,
            feats[1],
            test_y,
            epochs=cfg.eval.probe_epochs,
            lr=cfg.eval.probe_lr,
            seed=cfg.run.seed,
        )
        log.info("%s probe: top-1 %.4f (%.0f s)", name, result.top1, time.perf_counter() - t0)
        return {"top1": result.top1, "top5": result.top5}

    random_init = build_model(cfg).to(device).eval()
    pretrained.eval()
    return {
        "pretrained": probe(pretrained.features, "pretrained"),
        "random_init": probe(random_init.features, "random init"),
        "raw_pixels": probe(lambda x: x.flatten(1), "raw pixels", prep=lambda x: x.float().div(255)),
        "probe_train_size": n_train,
        "probe_test_size": n_test,
        "dataset": data.name,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of configs/demo_cpu.yaml")
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_config(DEMO_CONFIG, args.overrides)
    t0 = time.perf_counter()
    model = train(cfg)
    t_train = time.perf_counter() - t0
    results = probe_backbones(cfg, model)
    results.update(train_seconds=round(t_train, 1), total_seconds=round(time.perf_counter() - t0, 1))
    Path(cfg.run.dir, "probe.json").write_text(json.dumps(results, indent=2))
    gain = 100 * (results["pretrained"]["top1"] - results["random_init"]["top1"])
    rows = [
        (f"LeJEPA pretrained ({cfg.train.steps} steps)", f"{results['pretrained']['top1']:.4f}"),
        ("random init (same architecture)", f"{results['random_init']['top1']:.4f}"),
        ("raw pixels", f"{results['raw_pixels']['top1']:.4f}"),
        ("pretraining gain over random init", f"{gain:+.1f} points"),
        ("wall time", f"{results['total_seconds']:.0f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    test_set = f"{results['dataset']} test set ({results['probe_test_size']} images)"
    print(f"\nLinear probe on frozen features, {test_set}:")
    for label, value in rows:
        print(f"  {label:<{width}} : {value}")


if __name__ == "__main__":
    main()
