"""The named grids of config.yaml through the real `snakemake`: what `locality`, `kernels` and
`laptop` plan, and the laptop grid end to end on CIFAR-10 files the test writes (the real pickle
layout), with overrides that make it run in seconds."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_workflow import REPO, make_workdir, planned, snakemake

pytestmark = pytest.mark.slow

LOCALITY_MASKS = ["none", "gmm", "gmm_add", "gmm_official", "elm", "rmt", "alibi2d", "temperature", "lsa", "gpsa"]


def repo_config(work: Path, grid: str) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    return config | {"grid": grid, "src_dir": str(work / "src" / "gmmvit")}


def report_outputs(work: Path, *args: str) -> list[str]:
    """The report job's outputs in a dry run."""
    text = snakemake(work, "--dry-run", *args)
    lines = (text.stdout + text.stderr).splitlines()
    start = lines.index("rule report:")
    output = next(line for line in lines[start:] if line.strip().startswith("output:"))
    return output.split("output:", 1)[1].strip().split(", ")


@pytest.mark.parametrize(
    ("grid", "cells", "kernels"),
    [("locality", [(m, k) for m in ("vit", "swin") for k in LOCALITY_MASKS], False),
     ("kernels", [("vit", k) for k in ("none", "gmm-k1", "gmm-k3", "gmm", "gmm-k7", "gmm-k9")], True),
     ("laptop", [("vit", k) for k in ("none", "gmm", "elm")], False)],
)
def test_named_grid_plans_its_cells_plots_and_mask_figures(tmp_path: Path, grid: str, cells, kernels: bool) -> None:
    work = make_workdir(tmp_path, repo_config(tmp_path, grid))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    spec, recipe = config["grids"][grid], config["grids"][grid]["recipe"]
    assert spec["seeds"] == [0, 1, 2]
    dataset = {"laptop": "cifar10"}.get(grid, "digits")
    jobs = planned(work)
    assert jobs["train"] == sorted(f"results/runs/{recipe}/{dataset}/{m}-{k}/seed{s}/metrics.json"
                                   for m, k in cells for s in (0, 1, 2))
    assert ("prepare" in jobs) == (grid == "laptop")  # CIFAR-10 is downloaded once, by its own job
    outputs = report_outputs(work)
    assert ("results/plots/kernels.png" in outputs) == kernels  # accuracy against K: only with K variants
    assert sorted(o for o in outputs if "/masks/" in o) == sorted(
        f"results/plots/masks/{m}-{k}.png" for m, k in cells if k != "none")


def write_cifar10(folder: Path, per_class: int = 10, test_per_class: int = 5) -> None:
    """A tiny cifar-10-batches-py in the official layout: five training batches and a test batch
    (pickles with bytes keys, rows of 3072 channel-major bytes), batches.meta with the class names.
    Each class has its own mean colour, so the images are learnable."""
    rng = np.random.default_rng(0)

    def images(labels: list[int]) -> np.ndarray:
        levels = np.array(labels)[:, None] * 25 + 10
        return np.clip(levels + rng.normal(0, 20, (len(labels), 3072)), 0, 255).astype(np.uint8)

    folder.mkdir(parents=True)
    train = [c for c in range(10) for _ in range(per_class)]
    rng.shuffle(train)
    for i, chunk in enumerate(np.array_split(np.array(train), 5), start=1):
        labels = [int(c) for c in chunk]
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                 b"data": images(labels), b"filenames": [f"{j}.png".encode() for j in range(len(labels))]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = [c for c in range(10) for _ in range(test_per_class)]
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": test, b"data": images(test)}, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))


def test_laptop_grid_runs_on_cifar10_files(tmp_path: Path) -> None:
    """The laptop grid's recipe on a 100-image CIFAR-10: the prepare job adopts the files (no
    download), and a cell trains on a stratified subset with the laptop recipe's settings."""
    config = repo_config(tmp_path, "laptop")
    laptop = config["recipes"]["laptop"]
    # seconds, not an hour: what the test changes; everything else is the laptop recipe's
    config["recipes"]["laptop"] |= {"epochs": 1, "passes_per_epoch": 1, "limit_train": 40,
                                    "limit_test": 20, "batch_size": 16, "warmup_epochs": 0.5}
    work = make_workdir(tmp_path, config)
    write_cifar10(work / "data" / "cifar-10-batches-py")
    assert len(planned(work)["train"]) == 9
    cell = "results/runs/laptop/cifar10/vit-gmm/seed0/metrics.json"
    snakemake(work, cell)
    record = json.loads((work / cell).read_text())
    assert (record["dataset"], record["model"], record["mask"], record["recipe"]) == ("cifar10", "vit", "gmm", "laptop")
    # 40 stratified training images, 10% (one in ten, 4) held out to select the epoch; 20 test images
    assert (record["n_train"], record["n_val"], record["n_test"]) == (36, 4, 20)
    assert record["selection"] == "val" and record["num_classes"] == 10 and record["img_size"] == 32
    recipe = record["recipe_config"]
    for key in ("val_fraction", "mix_prob"):
        assert recipe[key] == laptop[key], key
    assert recipe["autoaugment"] is True and recipe["mask_kernels"] == 5  # the paper's, kept
    assert (work / "data/cifar-10-batches-py/.gmmvit-prepared.json").is_file()
    assert re.fullmatch(r"[0-9a-f]{16}", record["dataset_fingerprint"])
    assert (work / cell).with_name("mask_params.pt").is_file()
