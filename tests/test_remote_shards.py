"""Shards anywhere: training and evaluation read shards from a loopback HTTP server (fsspec) and
from a `pipe:` command, and a server killed and restarted mid-epoch costs retries, not samples."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, ROOT, TINY, losses, metrics, run_train, sample_sets, train_command
from tests.image_tree import class_tree_and_shards

STREAM = [*TINY, "train.batch_size=8", "train.log_every=1", "log.sample_keys=true", "data.num_workers=1",
          "checkpoint.every_steps=0", "data.order=stream"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 real JPEGs in 6 shards of 8 (6 steps of 8 per epoch)."""
    return class_tree_and_shards(tmp_path_factory.mktemp("remote"), classes=4, per_class=12, shard_size=8)[1]


class Server:
    """tests/shard_server.py in a process of its own, on one port across restarts."""

    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.process = folder, None
        self.start()

    def start(self) -> None:
        command = [sys.executable, str(ROOT / "tests/shard_server.py"), str(self.folder), str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "serving"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def server(shards):
    running = Server(shards)
    yield running
    running.kill()


def test_a_server_restarted_mid_epoch_costs_retries_not_samples(tmp_path, shards, server):
    """18 steps (3 epochs) over HTTP from the shards' manifest; the server is killed after step 3
    and back 2 s later: the readers retry with backoff, and every step trains on the samples, and to
    the loss, of the same run read from the local files."""
    steps = ["train.steps=18"]
    run_train(tmp_path / "local", *STREAM, *steps, "data.source=shards", f"data.train={shards}")
    remote = tmp_path / "http"
    overrides = [*STREAM, *steps, "data.source=shards", f"data.train={server.url('manifest-data.json')}"]
    proc = subprocess.Popen(
        train_command(remote, *overrides), stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    deadline = time.time() + 300
    while not ((remote / "metrics.jsonl").exists() and len(metrics(remote)) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    server.kill()
    time.sleep(2)
    server.start()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "read broke after" in stderr  # the retry says what happened
    assert sample_sets(remote) == sample_sets(tmp_path / "local") and len(sample_sets(remote)) == 18
    assert losses(remote) == losses(tmp_path / "local")
    last = metrics(remote)[-1]
    assert last["corrupt_samples"] == 0 and last["read_retries"] >= 1


def test_training_and_evaluation_read_shards_through_a_pipe_command_and_http(tmp_path, shards, server):
    piped = f"pipe:cat {shards}/data-{{000000..000005}}.tar"
    run_train(tmp_path / "pipe", *STREAM, "train.steps=6", "data.source=shards", f"data.train={piped}")
    run_train(tmp_path / "local", *STREAM, "train.steps=6", "data.source=shards", f"data.train={shards}")
    assert sample_sets(tmp_path / "pipe") == sample_sets(tmp_path / "local")
    out = tmp_path / "eval.json"
    evaluate = [sys.executable, "-m", "lejepa_scale.evaluate", "--checkpoint", str(tmp_path / "pipe")]
    evaluate += [
        "--train",
        server.url("manifest-data.json"),
        "--val",
        piped,
        "--probe",
        "knn",
        "--out",
        str(out),
    ]
    result = subprocess.run(evaluate, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train_images"] == report["val_images"] == 48 and 0 <= report["knn"]["top1"] <= 1
