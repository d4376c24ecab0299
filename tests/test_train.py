"""One training cell end to end, through the `gmmvit train` command users and the workflow call."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gmmvit.numerics import NumericsError, cpu_facts
from gmmvit.train import source_hash

GMMVIT = [sys.executable, "-m", "gmmvit.cli"]


def train(out: Path, *sets: str, model: str = "vit", mask: str = "gmm", recipe: str = "smoke",
          wait: bool = True, env_extra: dict | None = None, extra: list[str] = ()):
    cmd = GMMVIT + ["train", "--dataset", "digits", "--model", model, "--mask", mask, "--seed", "0",
                    "--recipe", recipe, "--out", str(out), *extra]
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
    assert record["best_top1"] >= 50 and record["learned"], rows
    assert record["best_top1"] == max(float(r["test_top1"]) for r in rows)
    assert record["last_top1"] == float(rows[-1]["test_top1"])
    # the headline epoch is chosen on the 10% validation hold-out, never on the test set
    assert record["selection"] == "val" and (record["n_train"], record["n_val"]) == (1293, 144)
    chosen = max(rows, key=lambda r: (float(r["val_top1"]), -float(r["val_loss"]), -int(r["epoch"])))
    assert record["selected_epoch"] == int(chosen["epoch"])
    assert record["selected_top1"] == float(chosen["test_top1"])
    # provenance the report relies on
    assert record["device"] == "cpu" and record["threads"] == 1
    # the default numerics are portable: ATen's AVX2 kernels and MKL's COMPATIBLE mode were in force
    assert record["numerics"] == "portable" and record["cpu_capability"] == "AVX2"
    assert record["mkl_branch"] == "COMPATIBLE" and record["kernel_environment"]["MKL_CBWR"] == "COMPATIBLE"
    assert record["cpu"] == cpu_facts() and record["cpu"]["model_name"]
    assert len(record["weights_sha256"]) == 64
    assert set(record["versions"]) >= {"torch", "timm", "gmmvit", "cuda", "cudnn", "mkl", "onednn"}
    assert record["source_hash"] == source_hash("vit", "gmm", "digits") and len(record["dataset_fingerprint"]) == 16
    assert record["recipe_config"]["epochs"] == 2 and record["params"] == 2_693_122
    # a finished cell keeps its record and mask parameters, not its 60 MB checkpoint
    assert not (out / "checkpoint.pt").exists() and (out / "mask_params.pt").exists()
    assert not (out / ".staging").exists()  # the staged run, moved in whole and cleared
    # a line per epoch, readable in a batch-job log (no bar: stdout is not a TTY)
    lines = [line for line in run.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "top1" in lines[0] and "\r" not in run.stdout


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    a, b = train(tmp_path / "a"), train(tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stdout + a.stderr
    ra = json.loads((tmp_path / "a" / "metrics.json").read_text())
    rb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert comparable(ra) == comparable(rb)
    assert [r["train_loss"] for r in history(tmp_path / "a")] == [r["train_loss"] for r in history(tmp_path / "b")]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    sets = ("epochs=4",)
    straight = train(tmp_path / "straight", *sets)
    assert straight.returncode == 0, straight.stdout + straight.stderr

    out = tmp_path / "killed"
    proc = train(out, *sets, wait=False)
    deadline = time.time() + 300
    while not (out / ".staging" / "checkpoint.pt").exists():  # killed after its first checkpoint
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


@pytest.mark.slow
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


def test_device_and_threads_follow_the_environment(monkeypatch):
    from gmmvit.train import pick_device, threads_from_environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    for var in ("GMMVIT_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert threads_from_environment() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads_from_environment() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # what the scheduler granted beats OMP
    assert threads_from_environment() == 3
    monkeypatch.setenv("GMMVIT_THREADS", "2")  # and an explicit request beats both
    assert threads_from_environment() == 2
    monkeypatch.setenv("GMMVIT_THREADS", "zero")
    assert threads_from_environment() == 3


@pytest.mark.slow
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


def test_checkpoint_resumes_when_mapped_as_from_a_gpu(tmp_path):
    """Resuming must not depend on where the checkpoint's tensors would be mapped: on a GPU box the
    old load put the RNG states on the GPU and every resume failed. The "meta" device stands in for
    a GPU here: restoring with it must still restore the CPU RNG and the sampler exactly."""
    from gmmvit.models import build_model
    from gmmvit.recipe import BUILTIN_RECIPES, build_optimizer, build_scheduler
    from gmmvit.cell_folder import atomic_torch_save, safe_torch_load
    from gmmvit.train import restore_checkpoint

    recipe = BUILTIN_RECIPES["smoke"]

    def fresh():
        torch.manual_seed(0)
        model = build_model("vit", mask="gmm")
        optimizer = build_optimizer(model, recipe)
        return model, optimizer, build_scheduler(optimizer, recipe, 4), torch.Generator().manual_seed(1)

    model, optimizer, scheduler, shuffle = fresh()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.rand(3), torch.rand(3, generator=shuffle)  # move both RNGs away from their seeds
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
             "rng_shuffle": shuffle.get_state(), "rng_cuda": None}
    atomic_torch_save(saved, tmp_path / "checkpoint.pt")
    expected = torch.rand(5), torch.rand(5, generator=shuffle)

    model2, optimizer2, scheduler2, shuffle2 = fresh()
    state = safe_torch_load(tmp_path / "checkpoint.pt")  # plain data: loads with weights_only
    restore_checkpoint(state, torch.device("meta"), model2, optimizer2, scheduler2, shuffle2)
    assert torch.equal(torch.rand(5), expected[0])
    assert torch.equal(torch.rand(5, generator=shuffle2), expected[1])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_subsets_and_validation_split_are_stratified_and_shared_by_cells():
    from gmmvit.splits import class_quotas, hold_out, stratified_indices

    labels = torch.arange(10).repeat_interleave(100)  # class-sorted, as CIFAR and folders are
    subset = stratified_indices(labels, 200)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [20] * 10  # every class, not 0-1
    assert torch.equal(subset, stratified_indices(labels, 200))  # the same for every cell
    assert len(set(subset.tolist())) == 200 and not torch.equal(subset, torch.arange(0, 1000, 5))
    keep, held = hold_out(labels, 0.1)
    assert len(held) == 100 and torch.bincount(labels[held]).tolist() == [10] * 10
    assert set(keep.tolist()).isdisjoint(held.tolist()) and len(keep) + len(held) == 1000
    # uneven classes: shares by largest remainder, summing to the count asked for
    uneven = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    assert class_quotas(uneven, 5) == {0: 3, 1: 1, 2: 1}  # 2.5, 1.5, 1.0: the tie goes to class 0
    assert hold_out(labels, 0.0)[1].numel() == 0
    with pytest.raises(ValueError, match="fraction"):
        hold_out(labels, 1.0)


def test_selection_never_looks_at_test_when_validation_exists():
    from gmmvit.train import select_epoch

    history = [
        {"epoch": 1, "val_top1": 80.0, "val_loss": 0.5, "test_top1": 70.0},
        {"epoch": 2, "val_top1": 90.0, "val_loss": 0.4, "test_top1": 60.0},
        {"epoch": 3, "val_top1": 90.0, "val_loss": 0.3, "test_top1": 75.0},  # tie: lower val loss
        {"epoch": 4, "val_top1": 70.0, "val_loss": 0.9, "test_top1": 99.0},
    ]
    assert select_epoch(history, on_validation=True)["epoch"] == 3
    assert select_epoch(history, on_validation=False)["epoch"] == 4  # the paper's best test epoch


def test_a_cell_that_learned_nothing_is_flagged():
    from gmmvit.train import did_not_learn

    assert "ln(10)" in did_not_learn(2.30, 17.2, 10)  # the Swin cell that stayed at ln 10
    assert "chance" in did_not_learn(1.2, 12.0, 10)
    assert did_not_learn(0.3, 95.0, 10) is None
    assert did_not_learn(3.0, 40.0, 200) is None  # ln 200 = 5.3: learning, with 200 classes


@pytest.mark.slow
def test_subset_validation_and_kept_checkpoint_in_a_real_cell(tmp_path):
    # smoke: 64 training digits, a quarter held out for validation; the checkpoint kept when asked
    out = tmp_path / "cell"
    run = train(out, "epochs=1", extra=["--keep-checkpoint", "yes"])
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((out / "metrics.json").read_text())
    assert (record["n_train"], record["n_val"], record["n_test"]) == (48, 16, 32)
    assert record["selection"] == "val" and record["val_fraction"] == 0.25
    assert (out / "checkpoint.pt").exists()
    assert "16 val" in run.stdout and "CPU capability" in run.stdout


@pytest.mark.slow
def test_killed_run_with_two_workers_resumes_to_the_one_worker_numbers(tmp_path):
    """Augmentation in worker processes: a run killed after its first checkpoint and resumed with 2
    workers gives the numbers of an uninterrupted run with 1 (per-batch seeds, not per-worker RNGs)."""
    sets = ("epochs=3",)
    straight = train(tmp_path / "straight", *sets, "workers=1")
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "data workers 1" in straight.stdout

    out = tmp_path / "killed"
    proc = train(out, *sets, "workers=2", wait=False)
    deadline = time.time() + 300
    while not (out / ".staging" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # its worker processes exit with it (torch watches the parent)
    proc.wait()
    resumed = train(out, *sets, "workers=2")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stdout + resumed.stderr
    cols = ("epoch", "train_loss", "val_loss", "test_loss", "test_top1", "lr")
    assert [[r[c] for c in cols] for r in history(tmp_path / "straight")] == \
           [[r[c] for c in cols] for r in history(out)]
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["recipe_config"].pop("workers") == 1 and b["recipe_config"].pop("workers") == 2
    assert comparable(a) == comparable(b)


def test_portable_numerics_are_refused_where_they_cannot_be_had(tmp_path):
    # more than one thread asked for: one line, exit 2, nothing trained
    run = train(tmp_path / "threads", extra=["--threads", "2"])
    assert run.returncode == 2 and "portable numerics trains on one thread" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "threads" / "history.csv").exists()
    # through the Python API in a process whose torch loaded with the native kernels (this one)
    from gmmvit.recipe import resolve_recipe
    from gmmvit.train import Cell, train_cell

    with pytest.raises(NumericsError, match="MKL_CBWR=COMPATIBLE"):
        train_cell(Cell("digits", "vit", "none", 0, "smoke"), resolve_recipe("smoke"), tmp_path / "api",
                   numerics="portable", progress=False)
    assert not (tmp_path / "api" / "history.csv").exists()


@pytest.mark.slow
def test_native_numerics_keep_the_cpus_own_kernels(tmp_path):
    run = train(tmp_path / "native", "epochs=1", extra=["--numerics", "native"])
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "native" / "metrics.json").read_text())
    assert record["numerics"] == "native" and record["mkl_branch"] != "COMPATIBLE"
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_set_determinism_sets_the_cuda_flags_the_readme_promises(monkeypatch):
    """deterministic: true turns on deterministic cuDNN / cuBLAS and algorithms (warn only where an
    operation has none) and off cuDNN's autotuning; false, the reverse. Checked without a GPU: the
    flags are torch's own, read back."""
    from gmmvit.train import set_determinism

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_determinism(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_determinism(False)
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


@pytest.mark.slow
def test_a_stale_checkpoint_is_ignored_and_a_finished_one_only_commits(tmp_path):
    """A staged checkpoint (where a killed run leaves it) of another recipe, or written by other code,
    must not be resumed from: the cell says it ignores it, and its history is a fresh run's. One of
    this very run, killed after its last epoch, resumes with no epoch left and only writes its outputs."""
    from gmmvit.cell_folder import safe_torch_load

    fresh = train(tmp_path / "fresh", "epochs=2")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    kept = tmp_path / "kept"
    first = train(kept, "epochs=1", extra=["--keep-checkpoint", "yes"])  # a finished 1-epoch run's checkpoint
    assert first.returncode == 0 and (kept / "checkpoint.pt").exists(), first.stdout + first.stderr
    other_code = safe_torch_load(kept / "checkpoint.pt")
    other_code["cell"][-1] = "0" * 16  # the source hash of some other version of the package
    cols = ("epoch", "train_loss", "test_loss", "test_top1", "lr")
    for name, sets, says, reference in (
            ("other-recipe", ("epochs=2",), "ignoring", tmp_path / "fresh"),
            ("other-code", ("epochs=1",), "written by other code", kept),
            ("finished", ("epochs=1",), "resuming", kept)):
        out = tmp_path / name
        (out / ".staging").mkdir(parents=True)
        if name == "other-code":
            torch.save(other_code, out / ".staging" / "checkpoint.pt")
        else:
            shutil.copy(kept / "checkpoint.pt", out / ".staging" / "checkpoint.pt")
        run = train(out, *sets)
        assert run.returncode == 0, run.stdout + run.stderr
        assert says in run.stdout and ("resuming" in run.stdout) == (name == "finished"), run.stdout
        assert [[r[c] for c in cols] for r in history(out)] == [[r[c] for c in cols] for r in history(reference)]
        assert not (out / ".staging").exists()
    assert "epoch   1/1" not in run.stdout  # the finished run trained no epoch again
