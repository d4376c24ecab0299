"""One training cell end to end, through the `gmmvit train` command users and the workflow call."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GMMVIT = [sys.executable, "-m", "gmmvit.cli"]


def train(out: Path, *sets: str, model: str = "vit", mask: str = "gmm", recipe: str = "smoke",
          wait: bool = True, env_extra: dict | None = None):
    cmd = GMMVIT + ["train", "--dataset", "digits", "--model", model, "--mask", mask, "--seed", "0",
                    "--recipe", recipe, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = os.environ | {"GMMVIT_THREADS": "1"} | (env_extra or {})
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


def comparable(record: dict) -> dict:
    """A record without what depends on the clock."""
    return {k: v for k, v in record.items() if k not in ("wall_time_s", "train_images_per_s")}


@pytest.mark.slow
def test_demo_cell_learns_digits(tmp_path):
    # The demo recipe, one epoch shorter: the loss falls and the accuracy is far above chance (10%).
    out = tmp_path / "cell"
    run = train(out, "epochs=2", recipe="demo")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = history(out)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    record = json.loads((out / "metrics.json").read_text())
    assert record["best_top1"] >= 50, rows
    assert record["best_top1"] == max(float(r["test_top1"]) for r in rows)
    assert record["last_top1"] == float(rows[-1]["test_top1"])
    # provenance the report relies on
    assert record["device"] == "cpu" and record["threads"] == 1
    assert set(record["versions"]) >= {"torch", "timm", "gmmvit"}
    assert record["recipe_config"]["epochs"] == 2 and record["params"] == 2_693_122
    assert (out / "checkpoint.pt").exists() and (out / "mask_params.pt").exists()
    # a line per epoch, readable in a batch-job log (no bar: stdout is not a TTY)
    lines = [line for line in run.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "top1" in lines[0] and "\r" not in run.stdout


def test_same_seed_same_numbers(tmp_path):
    a, b = train(tmp_path / "a"), train(tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stdout + a.stderr
    ra = json.loads((tmp_path / "a" / "metrics.json").read_text())
    rb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert comparable(ra) == comparable(rb)
    assert [r["train_loss"] for r in history(tmp_path / "a")] == [r["train_loss"] for r in history(tmp_path / "b")]


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    sets = ("epochs=4",)
    straight = train(tmp_path / "straight", *sets)
    assert straight.returncode == 0, straight.stdout + straight.stderr

    out = tmp_path / "killed"
    proc = train(out, *sets, wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists():  # killed after its first checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    resumed = train(out, *sets)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert comparable(a) == comparable(b)
    cols = ("epoch", "train_loss", "test_loss", "test_top1", "lr")
    assert [[r[c] for c in cols] for r in history(tmp_path / "straight")] == \
           [[r[c] for c in cols] for r in history(out)]


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    out = tmp_path / "nan"
    run = train(out, "lr=1e30", "warmup_epochs=0")
    assert run.returncode != 0
    assert "epoch 1, step" in run.stderr and "diverged" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not (out / "metrics.json").exists()


def test_unknown_dataset_and_recipe_key_fail_clearly(tmp_path):
    run = subprocess.run(GMMVIT + ["train", "--dataset", "mnist", "--model", "vit", "--out",
                                   str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0 and "valid names" in run.stderr and "digits" in run.stderr
    run = train(tmp_path / "y", "epoch=3")
    assert run.returncode != 0 and "unknown recipe key" in run.stderr and "epochs" in run.stderr


def test_missing_dataset_offline_names_folder(tmp_path):
    run = subprocess.run(GMMVIT + ["train", "--dataset", "cifar10", "--model", "vit", "--data-root",
                                   str(tmp_path), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and str(tmp_path) in run.stderr and "gmmvit prepare cifar10" in run.stderr
    assert "Traceback" not in run.stderr


def test_device_and_threads_follow_the_environment():
    from gmmvit.train import pick_device, threads_from_environment

    import torch

    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    old = dict(os.environ)
    try:
        os.environ.pop("GMMVIT_THREADS", None)
        os.environ["SLURM_CPUS_PER_TASK"] = "3"
        assert threads_from_environment() == 3
        os.environ["GMMVIT_THREADS"] = "2"
        assert threads_from_environment() == 2
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_paper_recipe_runs_with_augmentation_and_mixing(tmp_path):
    """The paper's full pipeline (flip, crop, AutoAugment, erasing, CutMix/Mixup) through the loop,
    on a small in-memory dataset with CIFAR's shape and policy."""
    import torch

    from gmmvit.data import ImageDataset
    from gmmvit.recipe import BUILTIN_RECIPES
    from gmmvit.train import Cell, train_cell

    g = torch.Generator().manual_seed(0)
    data = ImageDataset(
        name="cifar-like",
        train_images=torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_labels=torch.randint(0, 10, (48,), generator=g),
        test_images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
        test_labels=torch.randint(0, 10, (16,), generator=g),
        num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), autoaugment="cifar10",
        classes=tuple(str(i) for i in range(10)),
    )
    recipe = BUILTIN_RECIPES["paper"].replace(epochs=2, batch_size=16, warmup_epochs=1.0)
    record = train_cell(Cell("cifar-like", "vit", "gmm", 0, "paper"), recipe, tmp_path, dataset=data,
                        threads=1, progress=False)
    assert record["recipe_config"]["mix_prob"] == 0.5 and record["recipe_config"]["autoaugment"]
    rows = history(tmp_path)
    assert len(rows) == 2 and all(float(r["train_loss"]) > 0 for r in rows)
    # 48 images x 3 passes at batch 16: 9 steps an epoch, 18 in all; after step 9 the warm-up is
    # over and the cosine (spanning the run) is at its middle
    assert float(rows[0]["lr"]) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-6)
    assert float(rows[1]["lr"]) == pytest.approx(1e-6, rel=1e-6)
