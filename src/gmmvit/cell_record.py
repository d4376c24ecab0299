"""What a finished cell records: its identity, its numbers, and what produced them (code, data,
kernels, machine), as one flat JSON object, the only thing the report reads.

Also the judgement every table relies on: whether a cell learned at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import socket
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn

from . import __version__, numerics as numerics_mod
from .masks import LocalityMask, parse_mask_spec
from .recipe import Recipe
from .registry import cell_modules, code_files, code_hash

# A cell "did not learn" when its final train loss stays this close to ln(classes) (the loss of a
# uniform guess) or its selected top-1 stays below this multiple of chance: it is then flagged in
# the tables and never used as a baseline for a difference.
NOT_LEARNED_LOSS_RATIO = 0.95
NOT_LEARNED_CHANCE_MULTIPLE = 1.5


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    mask: str
    seed: int
    recipe_name: str


def source_hash(model: str, mask: str, dataset_kind: str | None) -> str:
    """Which code trained a cell: a hash of the package files it runs, the same files the workflow
    makes its inputs (gmmvit.registry), so that editing a model, a mask family or a dataset's
    module changes the hash of exactly the cells that run it, as it reruns exactly them."""
    return code_hash(code_files(*cell_modules("train.py", model, parse_mask_spec(mask)[0], dataset_kind)))


def run_environment(device: torch.device) -> dict[str, Any]:
    """Where the cell ran: device, CPU capability (it changes float rounding), host, and what the
    scheduler granted: SLURM job, node, CPUs, GPU ids (SLURM's or a local device slot's)."""
    cuda = device.type == "cuda"
    granted_cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    return {
        "device": torch.cuda.get_device_name(device) if cuda else str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "granted_cpus": int(granted_cpus) if granted_cpus and granted_cpus.isdigit() else None,
        # the physical ids behind cuda:0..: SLURM sets them for --gpus, gmmvit.devices for a slot
        "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_slot": os.environ.get("GMMVIT_DEVICE_SLOT"),
    }


def did_not_learn(final_train_loss: float, top1: float, num_classes: int) -> str | None:
    """Why a finished cell counts as not learned, or None if it learned."""
    uniform_loss, chance = math.log(num_classes), 100.0 / num_classes
    if final_train_loss >= NOT_LEARNED_LOSS_RATIO * uniform_loss:
        return (f"final train loss {final_train_loss:.3f} is within "
                f"{100 * (1 - NOT_LEARNED_LOSS_RATIO):.0f}% of ln({num_classes}) = {uniform_loss:.3f}")
    if top1 < NOT_LEARNED_CHANCE_MULTIPLE * chance:
        return f"top-1 {top1:.2f}% is below {NOT_LEARNED_CHANCE_MULTIPLE}x chance ({chance:.2f}%)"
    return None


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the final state's names, dtypes, shapes and bytes: what `gmmvit verify` compares,
    since a history's six printed digits hide most differences."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def mask_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {
        f"{name}.{p_name}": p.detach().cpu().clone()
        for name, m in model.named_modules() if isinstance(m, LocalityMask)
        for p_name, p in m.named_parameters()
    }


def select_epoch(history: list[dict], on_validation: bool) -> dict:
    """The reported epoch: the best on validation (ties: lower validation loss, then earlier), or,
    without a validation split, the best on test (the paper's way)."""
    if on_validation:
        return max(history, key=lambda h: (h["val_top1"], -h["val_loss"], -h["epoch"]))
    return max(history, key=lambda h: (h["test_top1"], -h["epoch"]))


def build_record(cell: Cell, recipe: Recipe, history: list[dict], *, on_validation: bool, model: nn.Module,
                 n_params: int, num_classes: int, img_size: int, sizes: tuple[int, int, int],
                 fingerprint: str, source: str, wall_time_s: float, train_seconds: float,
                 where: dict[str, Any], kernels: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The cell's flat record (metrics.json). ``sizes``: train, validation and test images;
    ``source``: :func:`source_hash` of the code that trained it."""
    best = max(history, key=lambda h: (h["test_top1"], -h["epoch"]))
    chosen = select_epoch(history, on_validation)
    final_train_loss = history[-1]["train_loss"]
    not_learned = did_not_learn(final_train_loss, chosen["test_top1"], num_classes)
    n_train, n_val, n_test = sizes
    return {
        "dataset": cell.dataset, "model": cell.model, "mask": cell.mask, "seed": cell.seed,
        "recipe": cell.recipe_name,
        # the headline: test top-1 at the epoch selected without looking at the test set when the
        # recipe holds out a validation split ("val"), else at the best test epoch ("test")
        "selection": "val" if on_validation else "test",
        "selected_epoch": chosen["epoch"], "selected_top1": chosen["test_top1"],
        "val_top1": chosen["val_top1"], "val_fraction": recipe.val_fraction,
        "best_top1": best["test_top1"], "best_epoch": best["epoch"],
        "last_top1": history[-1]["test_top1"], "last_test_loss": history[-1]["test_loss"],
        "final_train_loss": final_train_loss, "chance_top1": round(100.0 / num_classes, 4),
        "learned": not_learned is None, "not_learned_reason": not_learned,
        "epochs": recipe.epochs, "params": n_params,
        "wall_time_s": round(wall_time_s, 2),
        "train_images_per_s": round(
            sum(h["images_per_s"] * h["_seconds"] for h in history) / max(train_seconds, 1e-9), 2),
        **where, **kernels,
        "weights_sha256": weights_sha256(model),
        "num_classes": num_classes, "img_size": img_size,
        "n_train": n_train, "n_val": n_val, "n_test": n_test,
        "dataset_fingerprint": fingerprint,
        "source_hash": source,
        "deterministic": recipe.deterministic,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "gmmvit": __version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                     **numerics_mod.library_versions()},
        "recipe_config": recipe.to_dict(),
    }


__all__ = ["Cell", "build_record", "did_not_learn", "mask_parameters", "run_environment", "select_epoch",
           "source_hash", "weights_sha256"]
