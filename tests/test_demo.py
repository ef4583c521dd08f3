"""The CPU demo, end to end on a short budget, through its command line."""

import json
import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_short_demo_run_completes_and_writes_metrics(tmp_path):
    result = run(
        "lejepa_scale.demo",
        f"run.dir={tmp_path}",
        "train.steps=4",
        "train.batch_size=32",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "loss.num_slices=64",
        "demo.probe_train_size=256",
        "demo.probe_test_size=256",
        "demo.probe_epochs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("loss", "pred", "sigreg", "lr", "img_per_s", "probe_acc"):
        assert all(key in r for r in records)
    assert records[0]["lr"] < records[1]["lr"]  # warm-up
    probe = json.loads((tmp_path / "probe.json").read_text())
    for name in ("pretrained", "random_init", "raw_pixels"):
        assert 0.0 <= probe[name]["top1"] <= probe[name]["top5"] <= 1.0
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.pt").exists()
    assert "pretraining gain over random init" in result.stdout
    table = result.stdout.split("Linear probe on frozen features")[1].splitlines()
    rows = [line for line in table if " : " in line]
    assert len(rows) == 5 and len({row.index(" : ") for row in rows}) == 1  # one aligned column


def test_config_typo_fails_before_training(tmp_path):
    result = run(
        "lejepa_scale.train", "--config", "configs/demo_cpu_vit.yaml", f"run.dir={tmp_path}", "train.stpes=3"
    )
    assert result.returncode != 0
    assert "train.stpes" in result.stderr and "Did you mean: 'steps'" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_digits_demo_learns_in_a_short_run(tmp_path):
    """`python -m lejepa_scale.demo data.source=digits` (the demo where Fashion-MNIST cannot be had)
    runs its own recipe and, 40 steps in, its features beat its random initialisation (the full
    600-step run: docs/results.md)."""
    short = ["train.steps=40", "train.batch_size=64", "optim.warmup_steps=10", "checkpoint.every_steps=0"]
    result = run(
        "lejepa_scale.demo", "data.source=digits", f"run.dir={tmp_path}", *short, "log.wandb=disabled"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "the demo's data: scikit-learn's digits (data.source=digits), with demo_cpu_digits.yaml"
        in result.stderr
    )
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert (
        probe["dataset"] == "digits" and probe["pretrained"]["top1"] > probe["random_init"]["top1"] + 0.03
    ), probe
