"""What a new user meets following the README: its commands run verbatim on tiny data (ImageNet's
two splits into one folder, export + loading in timm, the ViT-G dry run), and every user mistake
answered with one line that names what is wrong and what to do, never a traceback."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from data_pipeline import convert
from data_pipeline.labelled import labelled_images
from data_pipeline.shards import resolve_classes, resolve_shards, split_manifests
from lejepa_scale import demo, evaluate, launch, plan, pretrained, report, train
from lejepa_scale.cluster.attempts import read_events
from lejepa_scale.config import ConfigError, load_config
from lejepa_scale.report import spatial_grid
from tests.helpers import DEMO, ENV, ROOT, TINY, run_train
from tests.image_tree import jpeg_bytes, make_class_tree, photo_crops

README = (ROOT / "README.md").read_text()
CNN_DEMO = ROOT / "configs" / "demo_cpu.yaml"
SHORT = ["train.steps=2", "train.batch_size=16", "train.log_every=1", "loss.num_slices=64"]


def cli(main, *args) -> subprocess.CompletedProcess:
    """An entry point's `main(args)` in this process, as its command line ends: exit code, stdout and
    stderr (the message of a `sys.exit("...")` lands on stderr, as Python prints it)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            result = main([str(a) for a in args])
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                err.write(e.code + "\n")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exactly one line on stderr, containing every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def readme_commands(prefix: str) -> list[str]:
    """README lines (backslash continuations joined, comments dropped) that start with `prefix`."""
    joined = README.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.startswith(prefix)]


# -- README workflows, verbatim -----------------------------------------------------------------------


def test_imagenet_train_and_val_converted_into_one_folder_both_stay_addressable(tmp_path):
    src = tmp_path / "imagenet"
    make_class_tree(src / "train", classes=3, per_class=4, seed=0)
    make_class_tree(src / "val", classes=3, per_class=2, seed=1)
    commands = readme_commands("python -m data_pipeline.convert imagenet --src /datasets/imagenet")
    commands += readme_commands("python -m data_pipeline.convert verify --out /datasets/imagenet")
    assert len(commands) == 3  # train, val, verify, as the README writes them
    for command in commands:
        argv = shlex.split(command.replace("/datasets/imagenet", str(src)))[3:]
        assert cli(convert.main, *argv).returncode == 0, command

    shards = src / "shards"
    splits = split_manifests(shards)
    assert sorted(splits) == ["train", "val"]
    train_set, val_set = resolve_shards(str(splits["train"])), resolve_shards(str(splits["val"]))
    assert sum(s.count for s in train_set) == 12 and sum(s.count for s in val_set) == 6
    assert all(Path(s.path).name.startswith("train-") for s in train_set)
    assert resolve_classes(str(splits["val"])) == resolve_classes(str(splits["train"]))
    with pytest.raises(ValueError, match=r"several splits.*manifest-train\.json.*manifest-val\.json"):
        resolve_shards(str(shards))
    evaluated = list(labelled_images(str(splits["val"]), "val", 32))
    assert sum(len(labels) for _, labels in evaluated) == 6

    # the recipes read the train manifest; a list of shards works as well (data.train, CLI and YAML)
    cfg = load_config(ROOT / "configs/vit_l14_in1k.yaml", ["run.dir=x"])
    assert cfg.data.train == "/datasets/imagenet/shards/manifest-train.json"
    listed = [s.path for s in train_set]
    yaml_list = tmp_path / "list.yaml"
    yaml_list.write_text("data:\n  source: shards\n  train:\n" + "".join(f"  - {p}\n" for p in listed))
    assert load_config(yaml_list, ["run.dir=x"]).data.train == listed
    run = tmp_path / "listed"
    shards_list = ["data.source=shards", f"data.train=[{','.join(listed)}]", "data.num_workers=0"]
    small = ["train.steps=1", "train.batch_size=8", "views.global_size=32", "views.local_size=16"]
    listed_run = run_train(run, *TINY, *shards_list, *small)
    assert f"data: 12 images in {len(listed)} shards" in listed_run.stderr  # the start log names the data
    assert (run / "model.pt").exists()

    # verify checks every split: a damaged val shard is found
    damaged = shards / val_set[0].path.split("/")[-1]
    damaged.write_bytes(damaged.read_bytes()[:-700])
    result = cli(convert.main, "verify", "--out", shards)
    assert result.returncode == 1 and damaged.name in result.stderr


def test_a_folder_converted_by_an_older_version_is_still_read(tmp_path):
    make_class_tree(tmp_path / "src", classes=2, per_class=3)
    assert cli(convert.main, "folder", "--src", tmp_path / "src", "--out", tmp_path / "old").returncode == 0
    (tmp_path / "old" / "manifest-data.json").rename(tmp_path / "old" / "manifest.json")
    assert sum(s.count for s in resolve_shards(str(tmp_path / "old"))) == 6
    assert cli(convert.main, "verify", "--out", tmp_path / "old").returncode == 0
    # converting the same split again supersedes the old manifest
    assert cli(convert.main, "folder", "--src", tmp_path / "src", "--out", tmp_path / "old").returncode == 0
    assert sorted(p.name for p in (tmp_path / "old").glob("manifest*")) == ["manifest-data.json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The demo's CNN (resnet10t, 28 px) and the ViT demo variant (tiny, 24 px), 2 steps each."""
    root = tmp_path_factory.mktemp("runs")
    cnn, vit = root / "cnn", root / "vit"
    first = subprocess.run(
        [sys.executable, "-m", "lejepa_scale.train", "--config", str(CNN_DEMO), f"run.dir={cnn}", *SHORT],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.search(r"step 2/2 ", first.stderr)  # console counts steps done, as checkpoints do
    run_train(vit, *TINY, "train.steps=2")
    return {"cnn": cnn, "vit": vit, "cnn_log": first.stderr}


def test_exported_backbones_load_in_timm_exactly_as_the_readme_says(runs, tmp_path):
    block = re.search(r"```python\n(import json, timm\n.*?)```", README, re.S).group(1)
    for kind in ("cnn", "vit"):
        out = tmp_path / f"{kind}.safetensors"
        result = cli(pretrained.main, "export", runs[kind], "--out", out)
        assert result.returncode == 0, result.stderr
        assert "timm_model" in result.stdout and "timm_kwargs" in result.stdout
        assert f'model.load_state_dict(load_file("{out}"))' in result.stdout  # the lines to paste
        scope = {}
        exec(block.replace("vit_l14_lejepa.safetensors", str(out)), scope)
        model = scope["model"].eval()
        own, cfg, _ = pretrained.load_run(runs[kind])
        images = torch.randn(3, 3, 28, 28)  # Fashion-MNIST's native size: the ViT trained at 24 px
        with torch.no_grad():
            assert torch.equal(model(images), own.features(images)), kind
        data = scope["data_config"]  # timm's data config: the run's normalisation and input size
        assert tuple(data["input_size"]) == (3, cfg.views.global_size, cfg.views.global_size), kind
        assert tuple(data["mean"]) == tuple(cfg.views.mean) and tuple(data["std"]) == tuple(cfg.views.std)
    meta = json.loads(scope["meta"]["timm_kwargs"])
    assert meta["dynamic_img_size"] is True and meta["img_size"] == 24


def test_the_readme_vit_g_dry_run_prints_the_script_without_the_shards(monkeypatch):
    monkeypatch.chdir(ROOT)
    (command,) = readme_commands("python -m lejepa_scale.launch --config configs/vit_g14")
    result = cli(launch.main, *shlex.split(command)[3:], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=16" in result.stdout
    assert (
        "python -m lejepa_scale.train --config configs/vit_g14_in1k_16nodes.yaml run.dir=/checkpoints/vitg14"
        in result.stdout
    )
    assert "dry run: a submission would stop here: data.train" in result.stderr
    assert "manifest-train.json" in result.stderr


# -- bugs ------------------------------------------------------------------------------------------


def test_a_tuple_of_the_wrong_length_names_its_key(tmp_path):
    line = "config key 'views.global_scale': takes 2 values, got 1 ([0.5])"
    one_line_error(cli(train.main, "--config", DEMO, f"run.dir={tmp_path}", "views.global_scale=[0.5]"), line)
    launched = cli(
        launch.main, "--config", DEMO, "--dry-run", f"run.dir={tmp_path}", "views.global_scale=[0.5]"
    )
    one_line_error(launched, "nothing submitted", line)
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text("views:\n  local_scale: [0.1, 0.2, 0.3]\n")
    with pytest.raises(ConfigError, match="'views.local_scale': takes 2 values, got 3"):
        load_config(yaml, ["run.dir=x"])


def test_launch_builds_the_backbone_before_submitting(tmp_path):
    result = cli(
        launch.main, "--config", DEMO, "--dry-run", f"run.dir={tmp_path}", "model.backbone_kwargs.depthh=3"
    )
    one_line_error(result, "nothing submitted", "model.backbone_kwargs", "depthh")
    assert not result.stdout


def test_evaluate_skips_unreadable_images_in_a_class_folder_and_names_them(runs, tmp_path, caplog):
    folder = tmp_path / "classes"
    make_class_tree(folder, classes=2, per_class=3)
    (folder / "n00001000" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "n00001001" / "notes.jpg").write_text("not an image")
    with caplog.at_level("WARNING"):
        images = list(labelled_images(str(folder), "train", 28))
    assert sum(len(labels) for _, labels in images) == 6
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert "gone.jpg" in caplog.text and "notes.jpg" in caplog.text
    out = tmp_path / "eval.json"
    args = ["--checkpoint", runs["cnn"], "--train", folder, "--val", folder, "--probe", "knn", "--out", out]
    assert cli(evaluate.main, *args).returncode == 0
    assert json.loads(out.read_text())["train_images"] == 6


def test_a_refused_resume_keeps_the_runs_config_and_names_the_model_it_holds(runs, tmp_path):
    run = tmp_path / "cnn"
    shutil.copytree(runs["cnn"], run)
    before = (run / "config.yaml").read_text()
    result = run_train(run, *TINY, "train.steps=3", check=False)  # the ViT recipe on the CNN run
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("error: ")
    assert "model.name 'resnet10t' (checkpoint) vs 'vit_tiny_patch16_224' (requested)" in last
    assert "Traceback" not in result.stderr
    assert (run / "config.yaml").read_text() == before


# -- messages --------------------------------------------------------------------------------------


def test_train_config_errors_are_one_line(tmp_path):
    command = [sys.executable, "-m", "lejepa_scale.train", "--config", str(DEMO), f"run.dir={tmp_path}"]
    typo = subprocess.run([*command, "train.stpes=3"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    one_line_error(typo, "config error: config key 'train.stpes'", "Did you mean: 'steps'")
    unknown = cli(train.main, "--config", DEMO, f"run.dir={tmp_path}", "model.name=vit_tiniest")
    one_line_error(unknown, "config error: model.name 'vit_tiniest' is not a timm model")
    assert not (tmp_path / "config.yaml").exists()


def test_bad_paths_are_one_line(tmp_path):
    missing = tmp_path / "missing"
    one_line_error(
        cli(convert.main, "verify", "--out", missing), f"error: --out {missing} is not a directory"
    )
    one_line_error(
        cli(convert.main, "folder", "--src", missing, "--out", tmp_path / "o"), f"--src {missing} is not"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli(convert.main, "verify", "--out", empty), "holds no manifest-<split>.json")
    one_line_error(cli(report.main, missing), f"error: {missing}: no metrics.jsonl")
    nodir = tmp_path / "nodir" / "x.safetensors"
    one_line_error(
        cli(pretrained.main, "export", missing, "--out", nodir), f"folder {nodir.parent} does not exist"
    )
    one_line_error(
        cli(pretrained.main, "export", missing, "--out", tmp_path / "x.safetensors"), "no complete checkpoint"
    )
    one_line_error(cli(launch.main, "status", missing), f"error: {missing} is not a run directory")


def test_a_local_run_is_recorded_and_a_finished_rerun_says_where_its_outputs_are(tmp_path):
    run = tmp_path / "local"
    args = ["--config", DEMO, "--local", "1", f"run.dir={run}", *TINY, "train.steps=2"]
    assert (
        subprocess.run(
            [sys.executable, "-m", "lejepa_scale.launch", *map(str, args)],
            env=ENV,
            cwd=ROOT,
            capture_output=True,
        ).returncode
        == 0
    )
    events = [e["event"] for e in read_events(run)]
    assert events == ["start", "finished"]
    status = cli(launch.main, "status", run).stdout
    assert "local run (--local 1), not submitted" in status and "starts: 1" in status
    rerun = run_train(run, *TINY, "train.steps=2")
    assert f"{run} is complete (step 2 of 2)" in rerun.stderr and "model.pt" in rerun.stderr
    assert "img/s" not in rerun.stderr


def test_report_says_why_there_is_no_sweep_and_labels_points_by_what_differs(runs, tmp_path):
    result = cli(report.main, runs["cnn"], "--out", tmp_path / "sweep", "--pca-images", "2")
    assert result.returncode == 0, result.stderr
    assert "no sweep plot: it needs 3 or more runs with eval.json, 0 of these have one" in result.stdout
    sweep = []
    for i, (lam, lr) in enumerate([(0.05, 1e-3), (0.05, 2e-3), (0.1, 1e-3)]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.yaml").write_text(f"run:\n  dir: {run}\nloss:\n  lam: {lam}\noptim:\n  lr: {lr}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0 + i}) + "\n")
        (run / "eval.json").write_text(json.dumps({"linear": {"top1": 0.5 - i / 10, "top5": 1.0}}))
        sweep.append(run)
    summary = report.sweep_summary(sweep, alpha=0.4)
    assert summary["differing_keys"] == ["loss.lam", "optim.lr"]
    assert [r["label"] for r in summary["runs"]] == [
        "lam=0.05, lr=0.001",
        "lam=0.05, lr=0.002",
        "lam=0.1, lr=0.001",
    ]


def test_a_1x1_feature_map_is_called_a_pooled_feature():
    assert spatial_grid(torch.zeros(2, 8, 1, 1), 0)[1].startswith("pooled feature")
    assert spatial_grid(torch.zeros(2, 8, 3, 3), 0)[1] == "feature map"
    assert spatial_grid(torch.zeros(2, 1 + 16, 8), 1)[0].shape == (2, 4, 4, 8)


def test_plan_says_which_hardware_it_assumed():
    result = cli(plan.main, "--config", ROOT / "configs/vit_l14_in1k.yaml")
    assert result.stdout.splitlines()[0] == "assuming --nodes 1 --gpus-per-node 8 --gpu-mem 80 (not given)"
    given = cli(
        plan.main, "--config", ROOT / "configs/vit_l14_in1k.yaml", "--nodes", "2", "--gpus-per-node", "4"
    )
    assert given.stdout.splitlines()[0] == "assuming --gpu-mem 80 (not given)"


@pytest.mark.parametrize(
    "module, main",
    [
        ("lejepa_scale.train", train.main),
        ("lejepa_scale.launch", launch.main),
        ("lejepa_scale.evaluate", evaluate.main),
        ("lejepa_scale.report", report.main),
        ("lejepa_scale.plan", plan.main),
        ("lejepa_scale.pretrained", pretrained.main),
        ("data_pipeline.convert", convert.main),
        ("lejepa_scale.demo", demo.main),
    ],
)
def test_help_names_the_module_and_says_whole_sentences(module, main):
    result = cli(main, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m {module}")
    description = result.stdout.split("\n\n")[1].replace("\n", " ").strip()
    assert description.endswith("."), description


def test_help_shows_defaults_and_what_evaluate_reads():
    assert "(default: 1000)" in cli(convert.main, "imagenet", "--help").stdout
    help_text = " ".join(cli(evaluate.main, "--help").stdout.split())  # argparse wraps lines
    train_help = help_text.split("--train TRAIN")[-1].split("--val VAL")[0]
    assert "manifest-<split>.json" in train_help and "one subfolder per class" in train_help


def test_a_png_named_png_is_converted_not_called_misnamed(tmp_path):
    from data_pipeline.convert import encode_image

    image = photo_crops(1, seed=0)[0]
    (tmp_path / "a.png").write_bytes(b"")
    image.save(tmp_path / "a.png")
    (tmp_path / "b.JPEG").write_bytes(b"")
    image.save(tmp_path / "b.JPEG", format="PNG")
    (tmp_path / "c.jpg").write_bytes(jpeg_bytes(image))
    assert encode_image(str(tmp_path / "a.png"), None)[3] == "PNG to JPEG"
    assert encode_image(str(tmp_path / "b.JPEG"), None)[3] == "PNG named .JPEG"
    assert encode_image(str(tmp_path / "c.jpg"), None)[3] is None
