"""The fast paths of issue 9: a CLI that starts without torch, augmentation in worker processes,
bf16 autocast, TF32 and torch.compile. Each must compute what the plain path computes (exactly, or
within its precision's tolerance) and leave the default recipes' numbers as they were."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmmvit.cell_folder as folder_module
from gmmvit.batches import BatchSeededImages, SeededBatches, training_loader
from gmmvit.data import ImageDataset, load_dataset
from gmmvit.recipe import BUILTIN_RECIPES, Recipe
from gmmvit.train import Cell, autocast, set_tf32, train_cell

# ---------------------------------------------------------------- start-up


@pytest.mark.parametrize("command", [None, "train", "prepare", "measure", "report"])
def test_help_answers_without_importing_torch(command):
    args = ["--help"] if command is None else [command, "--help"]
    probe = (
        "import sys\nfrom gmmvit.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as done:\n    assert done.code in (0, None), done\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: gmmvit" in run.stdout
    assert "TORCH False" in run.stderr, f"`gmmvit {' '.join(args)}` imported torch"


def test_cli_names_are_the_registries():
    from gmmvit import cli
    from gmmvit.masks import mask_class
    from gmmvit.models import model_builder, model_names

    # the names the parser offers (module files, read without torch) are names their modules register
    assert "vit" in cli.model_names() and cli.mask_names()[0] == "none"
    assert all(callable(model_builder(name)) for name in cli.model_names())
    assert all(mask_class(name) is not None for name in cli.mask_names()[1:])
    help_text = subprocess.run([sys.executable, "-m", "gmmvit.cli", "train", "--help"],
                               capture_output=True, text=True).stdout
    assert "{" + ",".join(model_names()) + "}" in help_text
    # a bad --mask still fails at parse time, naming the valid masks (the registry is imported then)
    run = subprocess.run([sys.executable, "-m", "gmmvit.cli", "measure", "--model", "vit", "--mask",
                          "gmmm"], capture_output=True, text=True)
    assert run.returncode == 2 and "valid masks" in run.stderr


# ---------------------------------------------------------------- data workers


def cifar_like(n_train: int = 64, n_test: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        name="cifar-like",
        train_images=torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_labels=torch.arange(n_train) % 10,
        test_images=torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        test_labels=torch.arange(n_test) % 10,
        num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), autoaugment="cifar10",
        classes=tuple(str(i) for i in range(10)),
    )


# The paper's whole augmentation (flip, crop, AutoAugment, erasing, CutMix/Mixup), 4 steps an epoch
PAPER_SHORT = BUILTIN_RECIPES["paper"].replace(epochs=2, passes_per_epoch=1, batch_size=16,
                                               warmup_epochs=0.5, eval_batch_size=64)


def history_rows(out: Path) -> list[dict]:
    """history.csv without the clock's column."""
    with open(out / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k not in ("wall_time_s", "train_images_per_s", "recipe_config")}


def test_seeded_batches_keep_the_image_order_and_draw_an_epoch_at_once():
    recipe = Recipe(batch_size=4, passes_per_epoch=2)
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    labels = torch.arange(10)

    def batches(workers: int, seed: int = 3):
        loader = training_loader(images, labels, None, recipe.replace(workers=workers),
                                 torch.Generator().manual_seed(seed), torch.device("cpu"))
        return list(loader.batch_sampler)

    plain, seeded = batches(0), batches(2)
    # the same images in the same batches as the in-process loader: only the augmentation differs
    assert [[i for i, _ in b] for b in seeded] == plain and len(plain) == 5  # 20 // 4, drop_last
    assert all(len({s for _, s in b}) == 1 for b in seeded)  # one seed a batch
    assert len({b[0][1] for b in seeded}) == 5  # and a different one for every batch
    assert seeded == batches(2) and seeded != batches(2, seed=4)
    # the epoch's seeds are drawn at its first batch: the generator's state after it (what a
    # checkpoint saves) does not depend on how many batches the loader prefetched
    g_one, g_all = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampler_one = training_loader(images, labels, None, recipe.replace(workers=1), g_one,
                                  torch.device("cpu")).batch_sampler
    sampler_all = training_loader(images, labels, None, recipe.replace(workers=1), g_all,
                                  torch.device("cpu")).batch_sampler
    next(iter(sampler_one))
    list(sampler_all)
    assert torch.equal(g_one.get_state(), g_all.get_state())
    assert isinstance(sampler_one, SeededBatches)


def test_a_batch_is_augmented_from_its_own_seed_only():
    from gmmvit.recipe import train_transform

    data = cifar_like()
    transform = train_transform(PAPER_SHORT, data.mean, data.std, "cifar10", 32)
    seeded = BatchSeededImages(data.train_images, data.train_labels, transform)
    batch = [(i, 1234) for i in range(8)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = torch.stack([x for x, _ in seeded.__getitems__(batch)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    seeded.__getitems__([(i, 99) for i in range(8, 16)])  # what a worker drew before changes nothing
    torch.rand(7)
    again = torch.stack([x for x, _ in seeded.__getitems__(batch)])
    other = torch.stack([x for x, _ in seeded.__getitems__([(i, 1235) for i in range(8)])])
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="one seed"):
        seeded.__getitems__([(0, 1), (1, 2)])


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_run(tmp_path):
    data = cifar_like()
    cell = Cell("cifar-like", "vit", "gmm", 0, "paper")
    records = {}
    for workers in (1, 2):
        records[workers] = train_cell(cell, PAPER_SHORT.replace(workers=workers), tmp_path / str(workers),
                                      dataset=data, threads=1, progress=False)
    assert history_rows(tmp_path / "1") == history_rows(tmp_path / "2")
    assert comparable(records[1]) == comparable(records[2])
    assert records[2]["recipe_config"]["workers"] == 2
    assert all(math.isfinite(float(r["train_loss"])) for r in history_rows(tmp_path / "1"))


@pytest.mark.slow
def test_a_resumed_run_with_workers_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    data = cifar_like()
    cell = Cell("cifar-like", "vit", "gmm", 0, "paper")
    recipe = PAPER_SHORT.replace(epochs=3, workers=2)
    straight = train_cell(cell, recipe, tmp_path / "straight", dataset=data, threads=1, progress=False)

    real_save = folder_module.atomic_torch_save

    class Killed(Exception):
        pass

    def save_then_die(obj, path):  # dies right after the first epoch's checkpoint is on disk
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            raise Killed

    monkeypatch.setattr(folder_module, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        train_cell(cell, recipe, tmp_path / "killed", dataset=data, threads=1, progress=False)
    monkeypatch.setattr(folder_module, "atomic_torch_save", real_save)
    assert len(history_rows(tmp_path / "killed" / ".staging")) == 1  # the run so far, staged
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG
    resumed = train_cell(cell, recipe, tmp_path / "killed", dataset=data, threads=1, progress=False)
    assert history_rows(tmp_path / "killed") == history_rows(tmp_path / "straight")
    assert comparable(resumed) == comparable(straight)


# ---------------------------------------------------------------- precision and compile


def tiny_vit():
    from gmmvit.models import build_model

    torch.manual_seed(0)
    return build_model("vit", mask="gmm", depth=2, embed_dim=64, num_heads=4, drop_path_rate=0.0)


def forward_backward(model, x, y, amp: bool = False):
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), amp):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits, loss, [p.grad.clone() for p in model.parameters()]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(scope="module")
def plain_smoke(tmp_path_factory) -> list[dict]:
    """The smoke cell's history on the plain path (float32, eager, in-process data)."""
    out = tmp_path_factory.mktemp("plain")
    train_cell(Cell("digits", "vit", "gmm", 0, "smoke"), BUILTIN_RECIPES["smoke"], out,
               dataset=load_dataset("digits"), threads=1, progress=False)
    return history_rows(out)


def smoke_with(tmp_path: Path, **keys) -> tuple[dict, list[dict]]:
    record = train_cell(Cell("digits", "vit", "gmm", 0, "smoke"), BUILTIN_RECIPES["smoke"].replace(**keys),
                        tmp_path, dataset=load_dataset("digits"), threads=1, progress=False)
    return record, history_rows(tmp_path)


def test_bf16_autocast_agrees_with_float32_loosely():
    model = tiny_vit()
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    logits, loss, grads = forward_backward(model, x, y)
    logits_bf16, loss_bf16, grads_bf16 = forward_backward(model, x, y, amp=True)
    assert logits.dtype == torch.float32 and logits_bf16.dtype == torch.bfloat16  # it did run in bf16
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% an operation)
    assert relative_error(logits_bf16, logits) < 0.05
    assert abs(loss_bf16.item() - loss.item()) < 0.02 * loss.item()
    cosines = [torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten(), dim=0)
               for a, b in zip(grads_bf16, grads) if b.norm() > 0]
    assert min(cosines) > 0.95 and relative_error(torch.cat([g.flatten() for g in grads_bf16]),
                                                  torch.cat([g.flatten() for g in grads])) < 0.1


@pytest.mark.slow
def test_smoke_cell_trains_with_amp(tmp_path, plain_smoke):
    record, rows = smoke_with(tmp_path, amp=True)
    assert record["recipe_config"]["amp"] is True
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert rows != plain_smoke  # bf16 changed the numbers ...
    first, plain_first = float(rows[0]["train_loss"]), float(plain_smoke[0]["train_loss"])
    assert abs(first - plain_first) < 0.05 * plain_first  # ... by bf16's rounding, not more


def test_tf32_switches_cuda_precision_and_changes_nothing_on_the_cpu(tmp_path, plain_smoke):
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        set_tf32(False)  # back to torch's own defaults
        assert (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision) == before
        record, rows = smoke_with(tmp_path, tf32=True)
        assert record["recipe_config"]["tf32"] is True
        assert rows == plain_smoke  # the CPU has no TF32: the very same numbers
    finally:
        set_tf32(False)


# torch.compile on this 2-core CPU: about 50 s for a first compile of a ViT (forward + backward) under
# load, a few seconds once inductor's on-disk cache holds the kernels.
@pytest.mark.slow
def test_compiled_model_agrees_with_eager_within_float32_rounding():
    model = tiny_vit()
    compiled = torch.compile(model)
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    logits_c, loss_c, grads_c = forward_backward(compiled, x, y)
    logits, loss, grads = forward_backward(model, x, y)
    assert relative_error(logits_c, logits) < 1e-5
    assert all(relative_error(a, b) < 1e-4 for a, b in zip(grads_c, grads) if b.norm() > 0)


@pytest.mark.slow
def test_smoke_cell_trains_compiled(tmp_path, plain_smoke):
    record, rows = smoke_with(tmp_path, compile=True)
    assert record["recipe_config"]["compile"] is True
    # float32 rounding differences only: the first epoch's loss agrees to 4 digits
    assert float(rows[0]["train_loss"]) == pytest.approx(float(plain_smoke[0]["train_loss"]), rel=1e-4)
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert not (tmp_path / "checkpoint.pt").exists()  # saved from the model itself, then removed
    params = torch.load(tmp_path / "mask_params.pt")
    assert params and not any(name.startswith("_orig_mod") for name in params)


@pytest.mark.slow
def test_speed_keys_reach_the_record_and_the_log(tmp_path, capsys):
    record = train_cell(Cell("cifar-like", "vit", "none", 0, "paper"),
                        PAPER_SHORT.replace(epochs=1, workers=1), tmp_path, dataset=cifar_like(),
                        threads=1, progress=False)
    assert {k: record["recipe_config"][k] for k in ("workers", "amp", "tf32", "compile")} == \
        {"workers": 1, "amp": False, "tf32": False, "compile": False}
    assert "data workers 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["recipe_config"]["workers"] == 1


# ---------------------------------------------------------------- the committed benchmark


@pytest.mark.slow
def test_speed_benchmark_times_each_cell_in_its_own_process():
    """benchmarks/speed.py runs end to end (tiny settings) and prints a row per model x mask x path
    (eager, compiled) whose ratios follow from its own step times, each cell timed in processes of
    its own (one per repeat, none of them the benchmark's)."""
    script = Path(__file__).parents[1] / "benchmarks" / "speed.py"
    run = subprocess.run([sys.executable, str(script), "--models", "vit", "--masks", "none", "elm",
                          "--compile", "--batch", "2", "--repeats", "2", "--steps", "1"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    rows = {tuple(cells[1:4]): cells for line in run.stdout.splitlines()
            if (cells := [c.strip() for c in line.split("|")]) and len(cells) > 3 and cells[1] == "vit"}
    assert set(rows) == {("vit", mask, path) for mask in ("none", "elm") for path in ("eager", "compiled")}
    step, per_s, vs_none, vs_eager, processes = 4, 5, 6, 8, 11
    seconds = {key: float(row[step]) for key, row in rows.items()}
    for (model, mask, path), row in rows.items():
        t = seconds[(model, mask, path)]
        assert float(row[per_s]) == pytest.approx(2 / t, abs=0.06)
        # the printed ratios are the step times' (two decimals; step times printed to 10 us)
        assert float(row[vs_none]) == pytest.approx(t / seconds[(model, "none", path)], abs=0.006)
        assert float(row[vs_eager]) == pytest.approx(t / seconds[(model, mask, "eager")], abs=0.006)
    parent = int(re.search(r"this process (\d+)", run.stdout)[1])
    pids = [int(p) for row in rows.values() for p in row[processes].split()]
    assert len(pids) == 4 * 2 and len(set(pids)) == len(pids) and parent not in pids


def test_speed_benchmark_refuses_a_device_torch_does_not_know():
    script = Path(__file__).parents[1] / "benchmarks" / "speed.py"
    run = subprocess.run([sys.executable, str(script), "--device", "gpu"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "--device 'gpu'" in run.stderr and "Traceback" not in run.stderr
