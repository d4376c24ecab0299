"""Train one (dataset, model, mask, seed, recipe) cell.

Reads top to bottom: setup, resume, loop (train an epoch, evaluate, checkpoint), write the record.
Outputs in the cell's directory, each written atomically (temporary file, then rename):
  history.csv      one row per epoch
  checkpoint.pt    latest state: model, optimiser, scheduler, RNG, epoch, history (for resume);
                   removed once the cell is done unless kept (--keep-checkpoint yes)
  mask_params.pt   the final mask parameters (for figures)
  metrics.json     the cell's flat record, written LAST and only on success

The reported epoch is selected on a validation split held out from the training set when the recipe
asks for one (``val_fraction``); the best test epoch (the paper's figure) and the last epoch are
recorded beside it. The record carries what produced it: source hash, dataset fingerprint, library
versions, device, CPU capability, threads, host, SLURM job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import socket
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from torchvision.transforms.v2.functional import resize
from tqdm import tqdm

from . import __version__, numerics as numerics_mod
from .data import ImageDataset, load_dataset
from .masks import LocalityMask, mask_options, parse_mask_spec
from .models import build_model
from .registry import cell_modules, code_files, code_hash
from .splits import hold_out, stratified_indices
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

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "test_loss", "test_top1", "lr",
                   "images_per_s"]
# A cell "did not learn" when its final train loss stays this close to ln(classes) (the loss of a
# uniform guess) or its selected top-1 stays below this multiple of chance: it is then flagged in
# the tables and never used as a baseline for a difference.
NOT_LEARNED_LOSS_RATIO = 0.95
NOT_LEARNED_CHANCE_MULTIPLE = 1.5


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


CHECK_EVERY = 50  # steps between finiteness checks of the loss (each check waits for the device)


def check_finite(loss_sum: Tensor, epoch: int, step: int, checked_up_to: int,
                 optimizer: torch.optim.Optimizer) -> None:
    """Raise if any loss since the epoch began was NaN or infinite (losses are >= 0, so their sum
    is finite exactly when every one of them is)."""
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(
            f"loss is {loss_sum.item()} at epoch {epoch + 1}, step {checked_up_to + 1}-{step + 1}: "
            f"training diverged (lr {optimizer.param_groups[0]['lr']:.3g}); no metrics written"
        )


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


def source_hash(model: str, mask: str) -> str:
    """Which code trained a cell: a hash of the package files it runs, the same files the workflow
    makes its inputs (gmmvit.registry), so that editing a model or a mask family changes the hash
    of exactly the cells that run it, as it reruns exactly them."""
    return code_hash(code_files(*cell_modules("train.py", model, parse_mask_spec(mask)[0])))


def set_determinism(on: bool) -> None:
    """Deterministic kernels where the device offers them; warn (never fail) where it does not."""
    if on:
        # cuBLAS needs this before its first use to be deterministic (documented by PyTorch)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


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


class BatchSeededImages(AugmentedImages):
    """The training images for worker processes: a batch arrives as (index, batch_seed) pairs and is
    augmented from torch's CPU RNG seeded with its batch seed. Its augmentation then depends neither
    on which worker draws it nor on what that worker drew before, so any worker count >= 1 gives the
    same numbers, and a resumed run (fresh workers) the same as an uninterrupted one."""

    def __getitems__(self, pairs: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        seeds = {seed for _, seed in pairs}
        if len(seeds) != 1:
            raise ValueError(f"a batch must carry one seed, got {len(seeds)}")
        # fork_rng puts the RNG back afterwards: harmless in a worker, and in the training process
        # (a test, a benchmark) the training RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seeds.pop())
            return super().__getitems__([index for index, _ in pairs])


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of ``batches`` (shuffled from the cell's generator), each index paired with one
    seed per batch, drawn from the same generator once the epoch's order is drawn."""

    def __init__(self, batches: BatchSampler, generator: torch.Generator) -> None:
        self.batches, self.generator = batches, generator

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        # The whole epoch is drawn at its first batch, so the generator's state after the epoch
        # (what the checkpoint saves) does not depend on how far the loader has prefetched.
        order = list(self.batches)
        seeds = torch.randint(0, 2**62, (len(order),), generator=self.generator).tolist()
        for batch, seed in zip(order, seeds):
            yield [(index, seed) for index in batch]


def training_loader(images: Tensor, labels: Tensor, transform, recipe: Recipe, shuffle: torch.Generator,
                    device: torch.device) -> DataLoader:
    """The training batches: ``passes_per_epoch`` shuffled passes an epoch, full batches only (unless
    the set is smaller than one batch).

    ``workers == 0``: augmented in this process from the training RNG, the loader every recipe has
    always used (its numbers unchanged). ``workers >= 1``: the same image order, augmented in
    persistent worker processes (one thread each: torch's worker loop sets it) from per-batch seeds.
    """
    num_samples = len(labels) * recipe.passes_per_epoch
    sampler = RandomSampler(range(len(labels)), num_samples=num_samples, generator=shuffle)
    drop_last = num_samples >= recipe.batch_size
    pin = device.type == "cuda"  # page-locked batches: the copies to the GPU can be asynchronous
    if recipe.workers == 0:
        return DataLoader(AugmentedImages(images, labels, transform), batch_size=recipe.batch_size,
                          sampler=sampler, drop_last=drop_last, pin_memory=pin)
    return DataLoader(
        BatchSeededImages(images, labels, transform),
        batch_sampler=SeededBatches(BatchSampler(sampler, recipe.batch_size, drop_last), shuffle),
        num_workers=recipe.workers, persistent_workers=True, pin_memory=pin,
        # The loader draws its workers' base seed whenever it makes an iterator (after a resume, at
        # another epoch): from this generator, not the training RNG, which it would shift. The
        # batches do not use the base seed: they are seeded by SeededBatches.
        generator=torch.Generator().manual_seed(0),
    )


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


def read_checkpoint(path: Path) -> dict | None:
    # Always to the CPU: mapped to a GPU, the RNG states could not be restored (set_rng_state and
    # Generator.set_state take CPU tensors), and every resume on a GPU would fail.
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def select_epoch(history: list[dict], on_validation: bool) -> dict:
    """The reported epoch: the best on validation (ties: lower validation loss, then earlier), or,
    without a validation split, the best on test (the paper's way)."""
    if on_validation:
        return max(history, key=lambda h: (h["val_top1"], -h["val_loss"], -h["epoch"]))
    return max(history, key=lambda h: (h["test_top1"], -h["epoch"]))


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


# ---------------------------------------------------------------- the cell


def train_cell(
    cell: Cell,
    recipe: Recipe,
    out_dir: str | Path,
    data_root: str | Path = "data",
    threads: int | None = None,
    progress: bool | None = None,
    dataset: ImageDataset | None = None,
    keep_checkpoint: bool = False,
    numerics: str = "native",
    model_overrides: dict | None = None,
) -> dict:
    """Train one cell, resuming from ``out_dir/checkpoint.pt`` if present; return its record.
    Once the record is written the checkpoint is removed, unless ``keep_checkpoint``.

    ``numerics``: ``portable`` (the CPU kernels whose bits any x86-64 CPU with AVX2 reproduces;
    their environment must have been set before torch loaded, as ``gmmvit train`` does) or
    ``native`` (gmmvit.numerics). ``model_overrides`` go to the model's builder (tests: a tiny model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a record exists only for a finished run
    device = pick_device()
    # refuses a portable cell it cannot give (and an explicit thread count above one for it)
    numerics_mod.configure(numerics, device.type, threads)
    threads = threads or threads_from_environment()
    if threads and not (numerics == "portable" and device.type == "cpu"):  # portable: one, set above
        torch.set_num_threads(threads)
    set_determinism(recipe.deterministic)
    set_tf32(recipe.tf32)
    if progress is None:
        progress = sys.stderr.isatty()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    # ---- data
    data = dataset or load_dataset(cell.dataset, root=data_root)
    fingerprint = data.fingerprint()  # which data trained the cell
    img_size = recipe.img_size or data.img_size
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    # Subsets and the validation hold-out are seeded and stratified by class, the same for every
    # cell of the dataset (datasets are stored class-sorted: "the first N" would be a few classes).
    if recipe.limit_train:
        keep = stratified_indices(train_y, min(recipe.limit_train, len(train_y)))
        train_x, train_y = train_x[keep], train_y[keep]
    if recipe.limit_test:
        keep = stratified_indices(test_y, min(recipe.limit_test, len(test_y)))
        test_x, test_y = test_x[keep], test_y[keep]
    keep, held = hold_out(train_y, recipe.val_fraction)
    val_x, val_y = train_x[held], train_y[held]
    train_x, train_y = train_x[keep], train_y[keep]
    on_validation = len(val_y) > 0
    if img_size != data.img_size:  # the recipe's img_size: resize once, in memory
        train_x, val_x, test_x = (resize(x, [img_size, img_size], antialias=True)
                                  for x in (train_x, val_x, test_x))

    # ---- model, optimisation (seeded: the same seed gives the same run)
    torch.manual_seed(cell.seed)
    # The cell's mask spec sets its K (gmm-k3); a family with a K and none in the spec takes the recipe's.
    mask_kwargs = mask_options(cell.mask, default_kernels=recipe.mask_kernels)
    model = build_model(cell.model, mask=cell.mask, img_size=img_size, num_classes=data.num_classes,
                        mask_kwargs=mask_kwargs, drop_path_rate=recipe.drop_path,
                        **(model_overrides or {})).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # portable: the fused AdamW (the default one takes MKL's square root, whose bits vary by CPU)
    optimizer = build_optimizer(model, recipe, fused=numerics == "portable" and device.type == "cpu")
    n_steps = steps_per_epoch(len(train_y), recipe)
    scheduler = build_scheduler(optimizer, recipe, n_steps)
    mixer = BatchMixer(recipe, data.num_classes)
    shuffle = torch.Generator().manual_seed(cell.seed)
    loader = training_loader(train_x, train_y,
                             train_transform(recipe, data.mean, data.std, data.autoaugment, img_size),
                             recipe, shuffle, device)
    # Training steps through the compiled model; evaluation, checkpoints and mask parameters use
    # the model itself (the same parameters), so evaluation compiles nothing more.
    step_model = torch.compile(model) if recipe.compile else model
    test_tf = eval_transform(data.mean, data.std)

    # ---- resume, only an unfinished run of this very cell and recipe
    cell_id = [cell.dataset, cell.model, cell.mask, cell.seed, numerics, model_overrides or {}]
    start_epoch, history, wall_before = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    state = read_checkpoint(ckpt_path)
    if state is not None and (state.get("recipe") != recipe.to_dict() or state.get("cell") != cell_id
                              or state["epoch"] >= recipe.epochs):
        # Left by another recipe, another cell, or a finished run that is being redone (e.g. the
        # code changed): resuming from it would return stale numbers.
        log(f"ignoring {ckpt_path}: it is from a finished run or another cell/recipe; starting afresh")
        state = None
    if state is not None:
        restore_checkpoint(state, device, model, optimizer, scheduler, shuffle)
        start_epoch, history, wall_before = state["epoch"], state["history"], state["wall_time_s"]
        log(f"resuming {out} from its checkpoint after epoch {start_epoch}")

    where = run_environment(device)
    kernels = numerics_mod.provenance(numerics)
    log(f"cell {cell.dataset}/{cell.model}-{cell.mask}/seed{cell.seed} recipe {cell.recipe_name}: "
        f"{n_params:,} parameters, {len(train_y)} train / {len(val_y)} val / {len(test_y)} test images "
        f"at {img_size}px, {recipe.epochs} epochs x {n_steps} steps")
    log(f"on {where['device']} (CPU capability {where['cpu_capability']}), {where['threads']} threads, "
        f"host {where['host']}" + (f", SLURM job {where['slurm_job_id']}" if where["slurm_job_id"] else "")
        + f"; numerics {numerics}, CPU {numerics_mod.cpu_label(kernels['cpu'])}, MKL mode "
        f"{kernels['mkl_branch']}; torch {torch.__version__}, timm {timm.__version__}, "
        f"source {source_hash(cell.model, cell.mask)}, data {fingerprint}, deterministic {recipe.deterministic}")
    log(f"data workers {recipe.workers}, bf16 autocast {recipe.amp}, TF32 {recipe.tf32} (CUDA only), "
        f"compiled {recipe.compile}")

    # ---- loop
    started = time.perf_counter()
    train_seconds = sum(h["_seconds"] for h in history if "_seconds" in h)
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, checked_up_to = torch.zeros((), dtype=torch.float64, device=device), 0, 0
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
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
            # Summed on the device in float64 (as a Python float would be): reading the loss every
            # step would make the host wait for the device at every step.
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if (step + 1) % CHECK_EVERY == 0:
                check_finite(loss_sum, epoch, step, checked_up_to, optimizer)
                checked_up_to = step + 1
            if progress:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
        check_finite(loss_sum, epoch, step, checked_up_to, optimizer)
        loss_sum = loss_sum.item()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        val_loss, val_top1 = (evaluate(model, val_x, val_y, test_tf, recipe.eval_batch_size, device,
                                       recipe.amp) if on_validation else (None, None))
        test_loss, top1 = evaluate(model, test_x, test_y, test_tf, recipe.eval_batch_size, device,
                                   recipe.amp)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 6),
            "val_loss": None if val_loss is None else round(val_loss, 6),
            "val_top1": None if val_top1 is None else round(val_top1, 4),
            "test_loss": round(test_loss, 6),
            "test_top1": round(top1, 4),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": round(seen / epoch_seconds, 2),
        }
        history.append(row | {"_seconds": epoch_seconds})
        chosen = select_epoch(history, on_validation)
        log(f"epoch {epoch + 1:>3}/{recipe.epochs}  train_loss {row['train_loss']:.4f}  "
            + (f"val_top1 {val_top1:6.2f}%  " if on_validation else "")
            + f"test_loss {test_loss:.4f}  top1 {top1:6.2f}%  selected {chosen['test_top1']:6.2f}% "
            f"(epoch {chosen['epoch']}, on {'val' if on_validation else 'test'})  lr {row['lr']:.2e}  "
            f"{row['images_per_s']:.0f} img/s  {epoch_seconds:.1f}s")
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
    best = max(history, key=lambda h: (h["test_top1"], -h["epoch"]))
    chosen = select_epoch(history, on_validation)
    final_train_loss = history[-1]["train_loss"]
    not_learned = did_not_learn(final_train_loss, chosen["test_top1"], data.num_classes)
    record = {
        "dataset": cell.dataset, "model": cell.model, "mask": cell.mask, "seed": cell.seed,
        "recipe": cell.recipe_name,
        # the headline: test top-1 at the epoch selected without looking at the test set when the
        # recipe holds out a validation split ("val"), else at the best test epoch ("test")
        "selection": "val" if on_validation else "test",
        "selected_epoch": chosen["epoch"], "selected_top1": chosen["test_top1"],
        "val_top1": chosen["val_top1"], "val_fraction": recipe.val_fraction,
        "best_top1": best["test_top1"], "best_epoch": best["epoch"],
        "last_top1": history[-1]["test_top1"], "last_test_loss": history[-1]["test_loss"],
        "final_train_loss": final_train_loss, "chance_top1": round(100.0 / data.num_classes, 4),
        "learned": not_learned is None, "not_learned_reason": not_learned,
        "epochs": recipe.epochs, "params": n_params,
        "wall_time_s": round(wall_before + time.perf_counter() - started, 2),
        "train_images_per_s": round(
            sum(h["images_per_s"] * h["_seconds"] for h in history) / max(train_seconds, 1e-9), 2),
        **where, **kernels,
        "weights_sha256": weights_sha256(model),
        "num_classes": data.num_classes, "img_size": img_size,
        "n_train": len(train_y), "n_val": len(val_y), "n_test": len(test_y),
        "dataset_fingerprint": fingerprint, "source_hash": source_hash(cell.model, cell.mask),
        "deterministic": recipe.deterministic,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "gmmvit": __version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                     **numerics_mod.library_versions()},
        "recipe_config": recipe.to_dict(),
    }
    atomic_write_bytes(out / "metrics.json", (json.dumps(record, indent=2) + "\n").encode())
    if not keep_checkpoint:  # ~60 MB a cell (12 GB over the paper grid); the record is what counts
        ckpt_path.unlink(missing_ok=True)
    log(f"done: top1 {record['selected_top1']:.2f}% at epoch {record['selected_epoch']} "
        f"(selected on {record['selection']}), best test {record['best_top1']:.2f}% "
        f"(epoch {record['best_epoch']}), last {record['last_top1']:.2f}%, "
        f"{record['wall_time_s']:.0f}s -> {out / 'metrics.json'}")
    if not_learned:
        log(f"warning: this cell did not learn ({not_learned}); the report flags it")
    return record


__all__ = ["Cell", "TrainingDiverged", "train_cell", "evaluate", "pick_device", "select_epoch",
           "did_not_learn", "read_checkpoint", "restore_checkpoint", "source_hash", "training_loader",
           "autocast", "set_tf32"]
