"""`python -m lejepa_scale.report RUN_DIR [RUN_DIR ...]`: PNG plots of training runs.

For each run (`<run>/report/`): the loss parts, the scaled loss, SIGReg health, lr and throughput,
and a PCA-of-patch-features picture of a few images. Given several runs that have evaluation results
(`eval.json` from `python -m lejepa_scale.evaluate`), also the sweep plot: final scaled loss
`loss / lam**alpha` against probe accuracy with Spearman's ρ (the paper's label-free model-selection
analysis), written with `sweep.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from data_pipeline.labelled import labelled_images  # noqa: E402
from data_pipeline.views import normalize  # noqa: E402
from lejepa_scale.method.health import COLLAPSE_PER_SAMPLE, GAUSSIAN_LEVEL  # noqa: E402
from lejepa_scale.pretrained import load_run  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_plots(run_dir: Path, out: Path) -> list[Path]:
    """losses.png, scaled_loss.png, health.png, lr_throughput.png for one run."""
    records = read_metrics(run_dir)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(
        axes, ("loss", "pred", "sigreg"), ("total", "prediction", "SIGReg"), strict=True
    ):
        ax.plot(*series(records, key))
        ax.set(title=f"{title} loss", xlabel="step")
    axes[2].set_yscale("log")
    written.append(_save(fig, out / "losses.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(*series(records, "scaled_loss"))
    ax.set(title="scaled loss  loss / λ^α  (lower is better)", xlabel="step")
    written.append(_save(fig, out / "scaled_loss.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    views = sorted({k for r in records for k in r if k.startswith("health/sigreg_view")})
    for key in views:
        axes[0].plot(*series(records, key), marker=".", label=key.removeprefix("health/sigreg_"))
    axes[0].axhline(GAUSSIAN_LEVEL, color="green", ls="--", label=f"Gaussian {GAUSSIAN_LEVEL}")
    collapse = [r["health/sigreg_collapse_level"] for r in records if "health/sigreg_collapse_level" in r]
    if collapse:
        axes[0].axhline(collapse[-1], color="red", ls="--", label=f"collapse {COLLAPSE_PER_SAMPLE}·N")
    axes[0].set(title="SIGReg per view", xlabel="step", yscale="log")
    axes[0].legend(fontsize=6)
    axes[1].plot(*series(records, "health/effective_rank_fraction"), marker=".")
    axes[1].set(title="effective rank / dimensions", xlabel="step", ylim=(0, 1.05))
    for key in ("std_min", "std_mean", "std_max"):
        axes[2].plot(*series(records, f"health/{key}"), marker=".", label=key)
    axes[2].set(title="per-dimension std of embeddings", xlabel="step")
    axes[2].legend(fontsize=7)
    if len(series(records, "health/effective_rank_fraction")[0]) == 1:  # one check: a step axis around it
        step = series(records, "health/effective_rank_fraction")[0][0]
        for ax in axes:
            ax.set_xlim(step - 1, step + 1)
    written.append(_save(fig, out / "health.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(*series(records, "lr"))
    axes[0].set(title="learning rate", xlabel="step")
    axes[1].plot(*series(records, "img_per_s"), label="images/s")
    axes[1].set(title="throughput (images/s, global)", xlabel="step")
    written.append(_save(fig, out / "lr_throughput.png"))
    return written


def spatial_grid(features: torch.Tensor, prefix_tokens: int) -> tuple[torch.Tensor, str]:
    """(N, H, W, C) features on their spatial grid and what they are: a ViT's patch tokens (after
    its prefix tokens), a CNN's last feature map, or its pooled feature when that map is 1x1."""
    if features.dim() == 4:  # a CNN's feature map (N, C, H, W)
        grid = features.permute(0, 2, 3, 1)
        return grid, "pooled feature (a 1x1 feature map)" if grid.shape[1:3] == (1, 1) else "feature map"
    patches = features[:, prefix_tokens:]
    side = int(math.isqrt(patches.shape[1]))
    return patches.reshape(len(features), side, side, patches.shape[-1]), "patch features"


@torch.no_grad()
def pca_picture(run_dir: Path, out: Path, n_images: int) -> Path:
    """The first three principal components of the spatial features of a few images (a ViT's patch
    tokens, a CNN's last feature map), as RGB."""
    model, cfg, _ = load_run(run_dir)
    backbone = model.backbone
    spec = cfg.data.source if cfg.data.source != "shards" else (cfg.data.val or cfg.data.train)
    size = cfg.views.global_size
    images, _ = next(labelled_images(spec, "val", size, 0, 1, limit=n_images))
    images = images[:n_images]
    features = backbone.forward_features(normalize(images, cfg.views.mean, cfg.views.std))
    grid, what = spatial_grid(features, getattr(backbone, "num_prefix_tokens", 0))
    flat = grid.reshape(-1, grid.shape[-1])
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    components = torch.nn.functional.pad(flat @ v[:3].T, (0, 3 - min(3, len(v))))  # < 3 points: fewer PCs
    lo, hi = components.min(0).values, components.max(0).values
    rgb = ((components - lo) / (hi - lo).clamp_min(1e-8)).reshape(*grid.shape[:3], 3)
    fig, axes = plt.subplots(2, len(images), figsize=(1.8 * len(images), 3.8), squeeze=False)
    for i in range(len(images)):
        axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(rgb[i].numpy(), interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(f"{what}: first 3 principal components as RGB")
    return _save(fig, out / "pca_patches.png")


def learning_curve_plot(results: dict, out: Path) -> Path:
    """Probe accuracy of the pretrained features against training steps, with random init and raw
    pixels as flat lines (the demo's `probe.json`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [point["step"] for point in results["curve"]]
    ax.plot(steps, [point["top1"] for point in results["curve"]], marker="o", label="LeJEPA pretrained")
    ax.axhline(results["raw_pixels"]["top1"], color="gray", ls="--", label="raw pixels")
    ax.axhline(results["random_init"]["top1"], color="red", ls=":", label="random init (same architecture)")
    ax.set(
        xlabel="training step", ylabel="linear probe top-1", title=f"{results['dataset']}: frozen features"
    )
    ax.legend()
    return _save(fig, out)


def final_loss(records: list[dict], fraction: float = 0.1) -> float:
    """Mean training loss over the last `fraction` of logged steps (one noisy step is not a signal)."""
    losses = [r["loss"] for r in records if "loss" in r]
    tail = losses[-max(1, int(len(losses) * fraction)) :]
    return sum(tail) / len(tail)


def sweep_summary(run_dirs: list[Path], alpha: float) -> dict:
    """Per run: λ, final loss, scaled loss and probe accuracy; Spearman ρ of accuracy with the scaled
    loss (α) and with the raw loss (α = 0). Lower loss should mean higher accuracy: ρ near -1."""
    runs = []
    for run_dir in run_dirs:
        evaluation = run_dir / "eval.json"
        if not evaluation.exists():
            raise ValueError(f"{run_dir}: no eval.json; run python -m lejepa_scale.evaluate on it first")
        result = json.loads(evaluation.read_text())
        probe = "linear" if "linear" in result else "knn"
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        lam = float(config["loss"]["lam"])
        loss = final_loss(read_metrics(run_dir))
        runs.append(
            {
                "run": str(run_dir),
                "config": flat_config(config),
                "lam": lam,
                "loss": loss,
                "scaled_loss": loss / lam**alpha,
                "accuracy": result[probe]["top1"],
                "probe": probe,
            }
        )
    differing = sorted(
        key for key in set().union(*(r["config"] for r in runs))
        if key != "run.dir" and len({repr(r["config"].get(key)) for r in runs}) > 1
    )  # fmt: skip
    for r in runs:
        r["label"] = ", ".join(f"{key.split('.')[-1]}={r['config'].get(key)}" for key in differing)
        del r["config"]
    accuracy = [r["accuracy"] for r in runs]
    return {
        "differing_keys": differing,
        "alpha": alpha,
        "spearman_scaled": float(spearmanr([r["scaled_loss"] for r in runs], accuracy).statistic),
        "spearman_raw": float(spearmanr([r["loss"] for r in runs], accuracy).statistic),
        "runs": runs,
    }


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """{'loss.lam': 0.05, ...}: the keys a sweep varies, to label its points by."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "backbone_kwargs":
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sweep_plot(summary: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, rho, label in (
        (axes[0], "scaled_loss", summary["spearman_scaled"], f"loss / λ^{summary['alpha']}"),
        (axes[1], "loss", summary["spearman_raw"], "loss"),
    ):
        xs = [r[key] for r in summary["runs"]]
        ys = [r["accuracy"] for r in summary["runs"]]
        ax.scatter(xs, ys)
        for r, x, y in zip(summary["runs"], xs, ys, strict=True):
            ax.annotate(r["label"] or Path(r["run"]).name, (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set(xlabel=f"final {label}", ylabel="probe top-1", title=f"Spearman ρ = {rho:.3f}")
    return _save(fig, out / "sweep_scaled_loss_vs_accuracy.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lejepa_scale.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("report"), help="where the sweep plot goes")
    p.add_argument("--alpha", type=float, default=0.4, help="scaled loss = loss / lam**alpha")
    p.add_argument("--pca-images", type=int, default=6, help="images in the PCA picture (0: none)")
    args = p.parse_args(argv)
    try:
        report(args.run_dirs, args.out, args.alpha, args.pca_images)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def report(run_dirs: list[Path], out_dir: Path, alpha: float, pca_images: int) -> None:
    """Each run's plots in `<run>/report/`; the sweep plot in `out_dir` when 3+ runs have eval.json."""
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").exists():
            raise ValueError(f"{run_dir}: no metrics.jsonl here (give run directories of lejepa_scale.train)")
    for run_dir in run_dirs:
        out = run_dir / "report"
        out.mkdir(exist_ok=True)
        written = training_plots(run_dir, out)
        if pca_images and (run_dir / "checkpoints").is_dir():
            written.append(pca_picture(run_dir, out, pca_images))
        print(f"{run_dir}: " + ", ".join(p.name for p in written))
    evaluated = [d for d in run_dirs if (d / "eval.json").exists()]
    if len(evaluated) < 3:
        print(f"no sweep plot: it needs 3 or more runs with eval.json, {len(evaluated)} of these have one "
              "(python -m lejepa_scale.evaluate --checkpoint RUN ... writes it)")  # fmt: skip
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = sweep_summary(evaluated, alpha)
        (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
        path = sweep_plot(summary, out_dir)
        print(
            f"sweep of {len(evaluated)} runs: Spearman ρ(probe top-1, loss/λ^{alpha}) = "
            f"{summary['spearman_scaled']:.3f}, ρ(probe top-1, loss) = {summary['spearman_raw']:.3f}; {path}"
        )


if __name__ == "__main__":
    main()
