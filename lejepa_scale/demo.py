"""`python -m lejepa_scale.demo [key=value ...]`: the CPU demo, end to end.

Pretrains `configs/demo_cpu.yaml` on Fashion-MNIST with LeJEPA, then fits the same linear probe on
frozen features of the pretrained backbone, of its random initialisation, and on raw pixels, and
prints the three test accuracies. Where Fashion-MNIST can be neither found nor downloaded (or with
`data.source=digits`) the demo runs `configs/demo_cpu_digits.yaml`, the recipe tuned for
scikit-learn's 8 px digits, and one line says which data it uses and why. Pixels are probed at the
images' native size, features at `demo.probe_size` (0: native). The checkpoints the run keeps
(every `checkpoint.keep_every` steps) give the learning curve: `<run.dir>/probe.json` and
`<run.dir>/learning_curve.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.builtin import find_fashion_mnist, load_builtin
from data_pipeline.views import normalize
from lejepa_scale.checkpointing.checkpoint import checkpoint_step, complete_checkpoints, load_model_weights
from lejepa_scale.config import Config, ConfigError, load_config
from lejepa_scale.distributed.process_groups import init_distributed
from lejepa_scale.evaluation.features import extract, in_batches
from lejepa_scale.evaluation.probes import linear_probe
from lejepa_scale.logging_setup import configure_logging
from lejepa_scale.report import learning_curve_plot
from lejepa_scale.train import train
from lejepa_scale.training.build import build_model, check_model

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
DIGITS_CONFIG = DEMO_CONFIG.with_name("demo_cpu_digits.yaml")
log = logging.getLogger("lejepa_scale.demo")


class Prober:
    """The demo's linear probe on frozen features of a fixed split, at the images' native size."""

    def __init__(self, cfg: Config):
        data = load_builtin(cfg.data.source, cfg.data.root)
        n_train = cfg.demo.probe_train_size or len(data.train_images)
        n_test = cfg.demo.probe_test_size or len(data.test_images)
        subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.run.seed))
        self.train = data.train_images[subset[:n_train]], data.train_labels[subset[:n_train]]
        self.test = data.test_images[:n_test], data.test_labels[:n_test]
        self.dataset, self.cfg = data.name, cfg
        self.device = init_distributed(cfg.train.device).device

    def __call__(self, encode, name: str, pixels: bool = False) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()

        def prepare(x: torch.Tensor) -> torch.Tensor:
            x = x.float().div(255)
            if pixels:
                return x.flatten(1)
            if cfg.demo.probe_size:  # small images (digits' 8 px): the size the network trained on
                x = F.interpolate(x, size=cfg.demo.probe_size, mode="bilinear", align_corners=False)
            return normalize(x.expand(-1, 3, -1, -1), cfg.views.mean, cfg.views.std)

        (train_x, _), (test_x, _) = (
            extract(encode, in_batches(*split, cfg.demo.batch_size), self.device, prepare)
            for split in (self.train, self.test)
        )
        result = linear_probe(train_x, self.train[1], test_x, self.test[1], epochs=cfg.demo.probe_epochs,
                              lr=cfg.demo.probe_lr, seed=cfg.run.seed)  # fmt: skip
        log.info("%s probe: top-1 %.4f (%.0f s)", name, result.top1, time.perf_counter() - t0)
        return {"top1": result.top1, "top5": result.top5}


def probe_run(cfg: Config, pretrained: torch.nn.Module) -> dict:
    """Pretrained vs random init vs raw pixels, and the pretrained features at every checkpoint
    the run kept (its learning curve)."""
    prober = Prober(cfg)
    random_init = build_model(cfg).to(prober.device).eval()
    curve = []
    for step_dir in complete_checkpoints(Path(cfg.run.dir) / "checkpoints"):
        model, step = build_model(cfg), checkpoint_step(step_dir)
        if step >= cfg.train.steps:
            continue  # the final weights are `pretrained` below
        load_model_weights(step_dir, model)
        curve.append({"step": step, **prober(model.to(prober.device).eval().features, f"step {step}")})
    results = {
        "pretrained": prober(pretrained.eval().features, "pretrained"),
        "random_init": prober(random_init.features, "random init"),
        "raw_pixels": prober(lambda x: x, "raw pixels", pixels=True),
        "probe_train_size": len(prober.train[0]),
        "probe_test_size": len(prober.test[0]),
        "dataset": prober.dataset,
        "image_size": prober.test[0].shape[-1],
    }
    results["curve"] = [*curve, {"step": cfg.train.steps, **results["pretrained"]}]
    return results


def recipe(config: Path, overrides: list[str]) -> Path:
    """The default demo's recipe for the data it can have: Fashion-MNIST's (found, or fetched into
    the cache), else the digits recipe, saying why; another --config stays as it is."""
    if Path(config).resolve() != DEMO_CONFIG:
        return config
    cfg = load_config(config, overrides)
    if cfg.data.source == "digits":
        log.info("the demo's data: scikit-learn's digits (data.source=digits), with %s", DIGITS_CONFIG.name)
        return DIGITS_CONFIG
    folder, where = find_fashion_mnist(cfg.data.root)
    if folder is None:
        log.warning("the demo's data: scikit-learn's digits, with %s, since Fashion-MNIST is %s",
                    DIGITS_CONFIG.name, where)  # fmt: skip
        return DIGITS_CONFIG
    log.info("the demo's data: Fashion-MNIST from %s", where)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lejepa_scale.demo",
        description="The CPU demo: pretrain, then probe frozen features of the pretrained backbone, of its "
        "random init, and raw pixels.",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    parser.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="the demo recipe (a ViT: configs/demo_cpu_vit.yaml)"
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(recipe(args.config, args.overrides), args.overrides)
        check_model(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    t0 = time.perf_counter()
    model = train(cfg)
    t_train = time.perf_counter() - t0
    results = probe_run(cfg, model)
    results.update(train_seconds=round(t_train, 1), total_seconds=round(time.perf_counter() - t0, 1))
    run_dir = Path(cfg.run.dir)
    (run_dir / "probe.json").write_text(json.dumps(results, indent=2))
    plot = learning_curve_plot(results, run_dir / "learning_curve.png")
    gain = 100 * (results["pretrained"]["top1"] - results["random_init"]["top1"])
    rows = [
        (f"LeJEPA pretrained ({cfg.train.steps} steps)", f"{results['pretrained']['top1']:.4f}"),
        ("random init (same architecture)", f"{results['random_init']['top1']:.4f}"),
        ("raw pixels", f"{results['raw_pixels']['top1']:.4f}"),
        ("pretraining gain over random init", f"{gain:+.1f} points"),
        ("wall time", f"{results['total_seconds']:.0f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    size = f"{results['image_size']} px" + (
        f", features at {cfg.demo.probe_size} px" if cfg.demo.probe_size else ""
    )
    test_set = f"{results['dataset']} test set ({results['probe_test_size']} images, {size})"
    print(f"\nLinear probe on frozen features ({cfg.model.name}), {test_set}:")
    for label, value in rows:
        print(f"  {label:<{width}} : {value}")
    print(f"learning curve: {plot}")


if __name__ == "__main__":
    main()
