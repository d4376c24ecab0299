"""Train one (dataset, model, mask, seed, recipe) cell.

Reads top to bottom: setup, resume, loop (train an epoch, evaluate, checkpoint), write the record.
Outputs in the cell's directory, each written atomically (temporary file, then rename):
  history.csv      one row per epoch
  checkpoint.pt    latest state: model, optimiser, scheduler, RNG, epoch, history (for resume)
  mask_params.pt   the final mask parameters (for figures)
  metrics.json     the cell's flat record, written LAST and only on success
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms.v2.functional import resize
from tqdm import tqdm

from . import __version__
from .data import ImageDataset, load_dataset
from .masks import LocalityMask
from .models import build_model
from .recipe import (
    BatchMixer,
    Recipe,
    build_optimizer,
    build_scheduler,
    eval_transform,
    soft_cross_entropy,
    steps_per_epoch,
    train_transform,
)

HISTORY_COLUMNS = ["epoch", "train_loss", "test_loss", "test_top1", "lr", "images_per_s"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    mask: str
    seed: int
    recipe_name: str


# ---------------------------------------------------------------- small helpers


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def threads_from_environment() -> int | None:
    """Thread count a scheduler granted us: GMMVIT_THREADS, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS."""
    for var in ("GMMVIT_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_history(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, text.getvalue().encode())


class AugmentedImages(Dataset):
    """uint8 images in memory, augmented per image as tensors when fetched."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        # A whole batch at once, on one thread: on a 32x32 image torch's intra-op threads cost far
        # more than they save (measured: AutoAugment & co. 5.7 ms per image on 2 threads, 0.18 on 1).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self[i] for i in indices]
        finally:
            torch.set_num_threads(threads)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, transform, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and top-1 in percent on the test split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = transform(images[start:start + batch_size]).to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss_sum / len(labels), 100.0 * correct / len(labels)


def mask_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {
        f"{name}.{p_name}": p.detach().cpu().clone()
        for name, m in model.named_modules() if isinstance(m, LocalityMask)
        for p_name, p in m.named_parameters()
    }


# ---------------------------------------------------------------- the cell


def train_cell(
    cell: Cell,
    recipe: Recipe,
    out_dir: str | Path,
    data_root: str | Path = "data",
    threads: int | None = None,
    progress: bool | None = None,
    dataset: ImageDataset | None = None,
) -> dict:
    """Train one cell, resuming from ``out_dir/checkpoint.pt`` if present; return its record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a record exists only for a finished run
    threads = threads or threads_from_environment()
    if threads:
        torch.set_num_threads(threads)
    device = pick_device()
    if progress is None:
        progress = sys.stderr.isatty()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    # ---- data
    data = dataset or load_dataset(cell.dataset, root=data_root)
    img_size = recipe.img_size or data.img_size
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    if recipe.limit_train:
        train_x, train_y = train_x[: recipe.limit_train], train_y[: recipe.limit_train]
    if recipe.limit_test:
        test_x, test_y = test_x[: recipe.limit_test], test_y[: recipe.limit_test]
    if img_size != data.img_size:  # the recipe's img_size: resize once, in memory
        train_x, test_x = (resize(x, [img_size, img_size], antialias=True) for x in (train_x, test_x))

    # ---- model, optimisation (seeded: the same seed gives the same run)
    torch.manual_seed(cell.seed)
    mask_kwargs = {"num_kernels": recipe.mask_kernels} if cell.mask == "gmm" else {}
    model = build_model(cell.model, mask=cell.mask, img_size=img_size, num_classes=data.num_classes,
                        mask_kwargs=mask_kwargs, drop_path_rate=recipe.drop_path).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, recipe)
    n_steps = steps_per_epoch(len(train_y), recipe)
    scheduler = build_scheduler(optimizer, recipe, n_steps)
    mixer = BatchMixer(recipe, data.num_classes)
    train_set = AugmentedImages(
        train_x, train_y, train_transform(recipe, data.mean, data.std, data.autoaugment, img_size)
    )
    shuffle = torch.Generator().manual_seed(cell.seed)
    # passes_per_epoch shuffled passes, each a fresh permutation, make one epoch
    sampler = RandomSampler(train_set, num_samples=len(train_set) * recipe.passes_per_epoch,
                            generator=shuffle)
    loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler,
                        drop_last=len(train_set) * recipe.passes_per_epoch >= recipe.batch_size,
                        pin_memory=device.type == "cuda")
    test_tf = eval_transform(data.mean, data.std)

    # ---- resume, only an unfinished run of this very cell and recipe
    cell_id = [cell.dataset, cell.model, cell.mask, cell.seed]
    start_epoch, history, wall_before = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    state = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.exists() else None
    if state is not None and (state.get("recipe") != recipe.to_dict() or state.get("cell") != cell_id
                              or state["epoch"] >= recipe.epochs):
        # Left by another recipe, another cell, or a finished run that is being redone (e.g. the
        # code changed): resuming from it would return stale numbers.
        log(f"ignoring {ckpt_path}: it is from a finished run or another cell/recipe; starting afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        shuffle.set_state(state["rng_shuffle"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_epoch, history, wall_before = state["epoch"], state["history"], state["wall_time_s"]
        log(f"resuming {out} from its checkpoint after epoch {start_epoch}")

    log(f"cell {cell.dataset}/{cell.model}-{cell.mask}/seed{cell.seed} recipe {cell.recipe_name}: "
        f"{n_params:,} parameters, {len(train_y)} train / {len(test_y)} test images at {img_size}px, "
        f"{recipe.epochs} epochs x {n_steps} steps, device {device}, {torch.get_num_threads()} threads")

    # ---- loop
    started = time.perf_counter()
    train_seconds = sum(h["_seconds"] for h in history if "_seconds" in h)
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = mixer(x, y)
            loss = soft_cross_entropy(model(x), target, recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: training diverged "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); no metrics written"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step_update(epoch * n_steps + step + 1)
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        test_loss, top1 = evaluate(model, test_x, test_y, test_tf, recipe.eval_batch_size, device)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 6),
            "test_loss": round(test_loss, 6),
            "test_top1": round(top1, 4),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": round(seen / epoch_seconds, 2),
        }
        history.append(row | {"_seconds": epoch_seconds})
        best = max(history, key=lambda h: h["test_top1"])
        log(f"epoch {epoch + 1:>3}/{recipe.epochs}  train_loss {row['train_loss']:.4f}  "
            f"test_loss {test_loss:.4f}  top1 {top1:6.2f}%  best {best['test_top1']:6.2f}% "
            f"(epoch {best['epoch']})  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  "
            f"{epoch_seconds:.1f}s")
        write_history(out / "history.csv", [{k: h[k] for k in HISTORY_COLUMNS} for h in history])
        atomic_torch_save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_shuffle": shuffle.get_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "epoch": epoch + 1, "history": history, "cell": cell_id,
                "wall_time_s": wall_before + time.perf_counter() - started,
                "recipe": recipe.to_dict(),
            },
            ckpt_path,
        )

    # ---- the record
    atomic_torch_save(mask_parameters(model), out / "mask_params.pt")
    best = max(history, key=lambda h: h["test_top1"])
    record = {
        "dataset": cell.dataset, "model": cell.model, "mask": cell.mask, "seed": cell.seed,
        "recipe": cell.recipe_name,
        "best_top1": best["test_top1"], "best_epoch": best["epoch"],
        "last_top1": history[-1]["test_top1"], "last_test_loss": history[-1]["test_loss"],
        "epochs": recipe.epochs, "params": n_params,
        "wall_time_s": round(wall_before + time.perf_counter() - started, 2),
        "train_images_per_s": round(
            sum(h["images_per_s"] * h["_seconds"] for h in history) / max(train_seconds, 1e-9), 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "gmmvit": __version__,
                     "python": platform.python_version()},
        "recipe_config": recipe.to_dict(),
    }
    atomic_write_bytes(out / "metrics.json", (json.dumps(record, indent=2) + "\n").encode())
    log(f"done: best top1 {record['best_top1']:.2f}% (epoch {record['best_epoch']}), "
        f"last {record['last_top1']:.2f}%, {record['wall_time_s']:.0f}s -> {out / 'metrics.json'}")
    return record


__all__ = ["Cell", "TrainingDiverged", "train_cell", "evaluate", "pick_device"]
