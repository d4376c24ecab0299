"""Train one (dataset, model, mask, seed, recipe) cell: setup, resume, the loop (train an epoch,
evaluate, checkpoint), the record. ``train_cell`` is the whole story; the rest are named helpers.

Outputs (gmmvit.cell_folder: staged, then swapped in whole, so a failed run keeps the earlier ones):
  history.csv      one row per epoch
  mask_params.pt   the final mask parameters (for figures)
  metrics.json     the cell's flat record (gmmvit.cell_record), moved in last
  checkpoint.pt    only with --keep-checkpoint yes; while the run lasts it lives in .staging/

The reported epoch is selected on a validation split held out from the training set when the recipe
asks for one (``val_fraction``); the best test epoch (the paper's figure) and the last epoch are
recorded beside it. The record carries what produced it: source hash, dataset fingerprint, library
versions, device, CPU and kernels, threads, host, SLURM job, the final weights' sha256.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import numerics as numerics_mod
from .batches import Splits, split_data, training_loader
from .cell_folder import HISTORY_COLUMNS, CellFolder
from .cell_record import (Cell, build_record, did_not_learn, mask_parameters, run_environment, select_epoch,
                          source_hash)
from .data import ImageDataset, load_dataset
from .errors import UserError
from .masks import mask_options
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

CHECK_EVERY = 50  # steps between finiteness checks of the loss (each check waits for the device)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite (exit 3: the recipe, not the command, needs a change)."""

    exit_code = 3


# ---------------------------------------------------------------- the cell


def train_cell(cell: Cell, recipe: Recipe, out_dir: str | Path, data_root: str | Path = "data",
               threads: int | None = None, progress: bool | None = None, dataset: ImageDataset | None = None,
               keep_checkpoint: bool = False, numerics: str = "native", model_overrides: dict | None = None,
               dataset_kind: str | None = None) -> dict:
    """Train one cell into ``out_dir``, resuming its unfinished run if there is one; return its record.

    ``numerics``: ``portable`` (CPU kernels whose bits any x86-64 CPU with AVX2 reproduces; their
    environment must be set before torch loads, as ``gmmvit train`` does) or ``native``
    (gmmvit.numerics). ``model_overrides`` go to the model's builder (tests: a tiny model).
    ``dataset_kind``: the registered dataset the data is (a user's image folder is ``folder``), whose
    module counts in the cell's source hash; default: the cell's dataset name when the data is
    loaded here, none when an ``ImageDataset`` is handed in (no dataset module made it)."""
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    progress = sys.stderr.isatty() if progress is None else progress
    device = configure_process(recipe, numerics, threads)
    folder = CellFolder(out_dir, log)
    folder.open()
    data = dataset or load_dataset(cell.dataset, root=data_root)
    if dataset_kind is None and dataset is None:
        dataset_kind = cell.dataset  # loaded by its name: a registered kind
    splits = split_data(data, recipe)
    on_validation = len(splits.val_y) > 0

    # model and optimisation, seeded: the same seed gives the same run
    torch.manual_seed(cell.seed)
    model = build_model(cell.model, mask=cell.mask, img_size=splits.img_size, num_classes=data.num_classes,
                        mask_kwargs=mask_options(cell.mask, default_kernels=recipe.mask_kernels),
                        drop_path_rate=recipe.drop_path, **(model_overrides or {})).to(device)
    # portable: the fused AdamW (the default one takes MKL's square root, whose bits vary by CPU)
    optimizer = build_optimizer(model, recipe, fused=numerics == "portable" and device.type == "cpu")
    n_steps = steps_per_epoch(len(splits.train_y), recipe)
    scheduler = build_scheduler(optimizer, recipe, n_steps)
    mixer = BatchMixer(recipe, data.num_classes)
    shuffle = torch.Generator().manual_seed(cell.seed)
    loader = training_loader(splits.train_x, splits.train_y,
                             train_transform(recipe, data.mean, data.std, data.autoaugment, splits.img_size),
                             recipe, shuffle, device)
    # steps through the compiled model; evaluation and checkpoints use the model itself (same parameters)
    step_model = torch.compile(model) if recipe.compile else model
    test_tf = eval_transform(data.mean, data.std)

    source = source_hash(cell.model, cell.mask, dataset_kind)  # which code: a checkpoint of other code is stale
    cell_id = [cell.dataset, cell.model, cell.mask, cell.seed, numerics, model_overrides or {}, source]
    history, wall_before = resume(folder, cell_id, recipe, device, model, optimizer, scheduler, shuffle)
    where, kernels = run_environment(device), numerics_mod.provenance(numerics)
    log_start(log, cell, recipe, model, splits, n_steps, where, kernels, numerics, data, source, folder)

    started = time.perf_counter()
    train_seconds = sum(h["_seconds"] for h in history)
    for epoch in range(len(history), recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, checked_up_to = torch.zeros((), dtype=torch.float64, device=device), 0, 0
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = mixer(x, y)
            with autocast(device, recipe.amp):
                loss = soft_cross_entropy(step_model(x), target, recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step_update(epoch * n_steps + step + 1)
            # summed on the device in float64: reading the loss every step would make the host wait
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if (step + 1) % CHECK_EVERY == 0:
                check_finite(loss_sum, epoch, step, checked_up_to, optimizer)
                checked_up_to = step + 1
            if progress:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
        check_finite(loss_sum, epoch, step, checked_up_to, optimizer)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        row = evaluate_epoch(model, splits, test_tf, recipe, device, epoch, loss_sum.item(), seen, seconds,
                             optimizer.param_groups[0]["lr"])
        history.append(row | {"_seconds": seconds})
        log_epoch(log, row, history, recipe, on_validation)
        wall = wall_before + time.perf_counter() - started
        folder.save_progress(history, checkpoint_state(model, optimizer, scheduler, shuffle, device, history,
                                                       cell_id, wall, recipe))

    record = build_record(cell, recipe, history, on_validation=on_validation, model=model,
                          n_params=count_parameters(model), num_classes=data.num_classes,
                          img_size=splits.img_size,
                          sizes=(len(splits.train_y), len(splits.val_y), len(splits.test_y)),
                          fingerprint=data.fingerprint(), source=source,
                          wall_time_s=wall_before + time.perf_counter() - started,
                          train_seconds=train_seconds, where=where, kernels=kernels, device=device)
    folder.commit((json.dumps(record, indent=2) + "\n").encode(), history, mask_parameters(model), keep_checkpoint)
    log_done(log, record, folder)
    return record


# ---------------------------------------------------------------- setup


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_process(recipe: Recipe, numerics: str, threads: int | None) -> torch.device:
    """The device, kernels, threads and determinism this process trains with."""
    device = pick_device()
    # refuses a portable cell it cannot give (and an explicit thread count above one for it)
    numerics_mod.configure(numerics, device.type, threads)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    threads = threads or threads_from_environment()
    if threads and not (numerics == "portable" and device.type == "cpu"):  # portable: one, set above
        torch.set_num_threads(threads)
    set_determinism(recipe.deterministic)
    set_tf32(recipe.tf32)
    return device


def set_determinism(on: bool) -> None:
    """Deterministic kernels where the device offers them; warn (never fail) where it does not."""
    if on:
        # cuBLAS needs this before its first use to be deterministic (documented by PyTorch)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def threads_from_environment() -> int | None:
    """Thread count a scheduler granted us: GMMVIT_THREADS, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS."""
    for var in ("GMMVIT_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return None


# torch's own float32 precision settings: what tf32 off restores. Read and set through the
# fp32_precision API only: torch refuses to report a flag set through a mix of it and allow_tf32.
_FP32_DEFAULTS = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


def set_tf32(on: bool) -> None:
    """CUDA float32 matmuls and convolutions in TF32 when on. Off: torch's defaults, as found when
    this module was imported (full float32 matmuls; convolutions in TF32, cuDNN's default in torch),
    so the default recipes compute what they always did. No effect on the CPU."""
    matmul, conv = ("tf32", "tf32") if on else _FP32_DEFAULTS
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.cudnn.conv.fp32_precision = conv


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast when ``amp`` (range of float32: no loss scaling needed), else nothing at all."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast when ``amp`` (range of float32: no loss scaling needed), else nothing at all."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- resume and checkpoints


def resume(folder: CellFolder, cell_id: list, recipe: Recipe, device: torch.device, model: nn.Module,
           optimizer: torch.optim.Optimizer, scheduler, shuffle: torch.Generator) -> tuple[list[dict], float]:
    """Restore the staged run of this very cell, recipe and code: its history and wall time so far
    (an empty history and 0 when there is none). A run killed after its last epoch resumes with no
    epoch left, and only its outputs are written."""

    def why_not(state: dict) -> str | None:
        # Left by another recipe, cell or version of the code: resuming it would give stale numbers.
        if state.get("recipe") != recipe.to_dict():
            return "it is from another recipe"
        if state.get("cell", [])[:-1] != cell_id[:-1]:
            return "it is from another cell"
        if state.get("cell") != cell_id:
            return f"it was written by other code (source {state['cell'][-1]}, now {cell_id[-1]})"
        return None

    state = folder.read_checkpoint(why_not)
    if state is None:
        return [], 0.0
    restore_checkpoint(state, device, model, optimizer, scheduler, shuffle)
    print(f"resuming {folder.out} from its checkpoint after epoch {state['epoch']}", flush=True)
    return state["history"], state["wall_time_s"]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, transform, batch_size: int,
             device: torch.device, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and top-1 in percent on a held-out split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = transform(images[start:start + batch_size]).to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss_sum / len(labels), 100.0 * correct / len(labels)


def restore_checkpoint(state: dict, device: torch.device, model: nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler, shuffle: torch.Generator) -> None:
    """Put a checkpoint's state back. ``state`` must have been loaded to the CPU (``read_checkpoint``):
    the RNG states must be CPU tensors whatever the device; model and optimiser copy to their own."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # casts its state to each parameter's device
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    shuffle.set_state(state["rng_shuffle"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"])


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, shuffle: torch.Generator,
                     device: torch.device, history: list[dict], cell_id: list, wall_time_s: float,
                     recipe: Recipe) -> dict[str, Any]:
    """Everything a resumed run needs to continue with the same bits: tensors and plain data only
    (it is loaded with weights_only)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_shuffle": shuffle.get_state(),
        "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        "epoch": len(history), "history": history, "cell": cell_id,
        "wall_time_s": wall_time_s, "recipe": recipe.to_dict(),
    }


# ---------------------------------------------------------------- one epoch's numbers


def check_finite(loss_sum: Tensor, epoch: int, step: int, checked_up_to: int,
                 optimizer: torch.optim.Optimizer) -> None:
    """Raise if any loss since the epoch began was NaN or infinite (losses are >= 0, so their sum
    is finite exactly when every one of them is)."""
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(
            f"loss is {loss_sum.item()} at epoch {epoch + 1}, step {checked_up_to + 1}-{step + 1}: "
            f"training diverged (lr {optimizer.param_groups[0]['lr']:.3g}); no metrics written"
        )


def evaluate_epoch(model: nn.Module, splits: Splits, transform, recipe: Recipe, device: torch.device,
                   epoch: int, loss_sum: float, seen: int, seconds: float, lr: float) -> dict[str, Any]:
    """The epoch's history row: train loss, validation and test loss and top-1, lr, speed."""
    val_loss, val_top1 = (evaluate(model, splits.val_x, splits.val_y, transform, recipe.eval_batch_size,
                                   device, recipe.amp) if len(splits.val_y) else (None, None))
    test_loss, top1 = evaluate(model, splits.test_x, splits.test_y, transform, recipe.eval_batch_size, device,
                               recipe.amp)
    return {
        "epoch": epoch + 1,
        "train_loss": round(loss_sum / seen, 6),
        "val_loss": None if val_loss is None else round(val_loss, 6),
        "val_top1": None if val_top1 is None else round(val_top1, 4),
        "test_loss": round(test_loss, 6),
        "test_top1": round(top1, 4),
        "lr": lr,
        "images_per_s": round(seen / seconds, 2),
    }


# ---------------------------------------------------------------- the log


def log_start(log, cell: Cell, recipe: Recipe, model: nn.Module, splits: Splits, n_steps: int,
              where: dict, kernels: dict, numerics: str, data: ImageDataset, source: str,
              folder: CellFolder) -> None:
    log(f"cell {cell.dataset}/{cell.model}-{cell.mask}/seed{cell.seed} recipe {cell.recipe_name}: "
        f"{count_parameters(model):,} parameters, {len(splits.train_y)} train / {len(splits.val_y)} val / "
        f"{len(splits.test_y)} test images at {splits.img_size}px, {recipe.epochs} epochs x {n_steps} steps")
    log(f"on {where['device']} (CPU capability {where['cpu_capability']}), {where['threads']} threads, "
        f"host {where['host']}" + (f", SLURM job {where['slurm_job_id']}" if where["slurm_job_id"] else "")
        + f"; numerics {numerics}, CPU {numerics_mod.cpu_label(kernels['cpu'])}, MKL mode "
        f"{kernels['mkl_branch']}; torch {torch.__version__}, timm {timm.__version__}, "
        f"source {source}, data {data.fingerprint()}, "
        f"deterministic {recipe.deterministic}")
    log(f"data workers {recipe.workers}, bf16 autocast {recipe.amp}, TF32 {recipe.tf32} (CUDA only), "
        f"compiled {recipe.compile}; working in {folder.staging}")


def log_epoch(log, row: dict, history: list[dict], recipe: Recipe, on_validation: bool) -> None:
    chosen = select_epoch(history, on_validation)
    log(f"epoch {row['epoch']:>3}/{recipe.epochs}  train_loss {row['train_loss']:.4f}  "
        + (f"val_top1 {row['val_top1']:6.2f}%  " if on_validation else "")
        + f"test_loss {row['test_loss']:.4f}  top1 {row['test_top1']:6.2f}%  selected {chosen['test_top1']:6.2f}% "
        f"(epoch {chosen['epoch']}, on {'val' if on_validation else 'test'})  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.0f} img/s  {history[-1]['_seconds']:.1f}s")


def log_done(log, record: dict, folder: CellFolder) -> None:
    log(f"done: top1 {record['selected_top1']:.2f}% at epoch {record['selected_epoch']} "
        f"(selected on {record['selection']}), best test {record['best_top1']:.2f}% "
        f"(epoch {record['best_epoch']}), last {record['last_top1']:.2f}%, "
        f"{record['wall_time_s']:.0f}s -> {folder.out / 'metrics.json'}")
    if not record["learned"]:
        log(f"warning: this cell did not learn ({record['not_learned_reason']}); the report flags it")


__all__ = ["CHECK_EVERY", "HISTORY_COLUMNS", "Cell", "TrainingDiverged", "autocast", "did_not_learn",
           "evaluate", "pick_device", "restore_checkpoint", "select_epoch", "set_determinism", "set_tf32",
           "source_hash", "train_cell"]
