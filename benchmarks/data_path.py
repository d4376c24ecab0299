"""The data path of a training job, in one run: does the data keep the step busy, and how long does
a job take to reach its first step?

    python benchmarks/data_path.py                      # everything (about 10 minutes on 2 cores)
    python benchmarks/data_path.py --skip-startup       # only the loop and augmentation figures

Prints, for the 2.7M ViT at batch 128, 32x32, with the paper's augmentation (flip, crop, AutoAugment
CIFAR10 policy, random erasing, CutMix/Mixup):
1. the full training loop (data + step) over the model-only step, with the batches augmented in
   the training process (workers 0) and in 1 and 2 worker processes; the model-only step in bf16
   autocast beside it (the recipe's ``amp`` on this CPU);
2. the augmentation alone, in images/s: in the training process on one thread, and through the
   loader with 1 and 2 worker processes (no model);
3. job start-up, from launching ``gmmvit train`` to the first batch in hand, for digits, a CIFAR-10-
   format set and a Tiny-ImageNet-format tree that the benchmark writes itself in a temporary folder
   (the real on-disk formats: pickled batches; JPEG files in class folders), each without and with
   its decoded cache. The tree has the real 110,000 images unless ``--tiny-images`` makes it
   smaller, in which case the growing parts are extrapolated linearly;
4. whether the workers would keep a GPU busy: the images/s they supply against the images/s a GPU
   step consumes at a stated step time (``--gpu-step-ms``, an assumption, not a measurement).

Repeats are interleaved (0, 1, 2 workers, 0, 1, 2, ...) and medians reported: this machine is shared
and noisy, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gmmvit.data import CACHE_DIR
from gmmvit.models import build_model
from gmmvit.recipe import BUILTIN_RECIPES, BatchMixer, soft_cross_entropy, train_transform
from gmmvit.batches import AugmentedImages, training_loader
from speed import make_step  # benchmarks/ is on the path when this file is run as a script

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TINY_REAL_IMAGES = 110_000  # Tiny-ImageNet: 100,000 train + 10,000 val
TINY_CLASSES = 200


def random_cifar_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


# ---------------------------------------------------------------- 1. loop over model-only step


def loop_step_seconds(loader, model, optimizer, mixer, steps: int) -> list[float]:
    """Seconds per step of the training loop over ``steps`` batches of one epoch, from the batch
    request to the optimiser step (the data wait included); the epoch's first batch is not timed
    (it waits for the workers' first batches, which a long epoch amortises)."""
    recipe = BUILTIN_RECIPES["paper"]
    times: list[float] = []
    batches = iter(loader)
    next(batches)
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, target = mixer(x, y)
        loss = soft_cross_entropy(model(x), target, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    for _ in batches:  # drain the epoch, so the next round starts a fresh one
        pass
    return times


def measure_loop(batch: int, steps: int, rounds: int, worker_counts: list[int]) -> dict[str, float]:
    recipe = BUILTIN_RECIPES["paper"]
    images, labels = random_cifar_like(batch * (steps + 1))
    transform = train_transform(recipe, CIFAR_MEAN, CIFAR_STD, "cifar10", 32)
    torch.manual_seed(0)
    model = build_model("vit", img_size=32, num_classes=10, drop_path_rate=recipe.drop_path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mixer = BatchMixer(recipe, 10)
    loaders = {w: training_loader(images, labels, transform, recipe.replace(batch_size=batch,
                                                                             passes_per_epoch=1, workers=w),
                                  torch.Generator().manual_seed(0), torch.device("cpu"))
               for w in worker_counts}
    _, step_fp32 = make_step("vit", "none", batch, 32)
    _, step_bf16 = make_step("vit", "none", batch, 32, amp=True)
    step_bf16()  # its warm-up beyond make_step's: autocast's first-call caches
    times: dict[str, list[float]] = {"model": [], "model_bf16": []} | {f"loop{w}": [] for w in worker_counts}
    for r in range(rounds):  # interleaved, so the machine's drift hits every figure alike
        times["model"] += [step_fp32() for _ in range(steps)]
        times["model_bf16"] += [step_bf16() for _ in range(steps)]
        for w, loader in loaders.items():
            times[f"loop{w}"] += loop_step_seconds(loader, model, optimizer, mixer, steps)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return {key: batch / statistics.median(ts) for key, ts in times.items()}


# ---------------------------------------------------------------- 2. augmentation alone


def augmentation_in_process(batch: int, batches: int) -> float:
    """Images/s of the paper's augmentation in the training process (one thread, as the loader's
    in-process path runs it)."""
    recipe = BUILTIN_RECIPES["paper"]
    images, labels = random_cifar_like(batch * batches)
    data = AugmentedImages(images, labels, train_transform(recipe, CIFAR_MEAN, CIFAR_STD, "cifar10", 32))
    data.__getitems__(list(range(batch)))  # warm-up
    t0 = time.perf_counter()
    for b in range(batches):
        data.__getitems__(list(range(b * batch, (b + 1) * batch)))
    return batch * batches / (time.perf_counter() - t0)


def augmentation_loader(batch: int, batches: int, workers: int):
    recipe = BUILTIN_RECIPES["paper"].replace(batch_size=batch, passes_per_epoch=1, workers=workers)
    images, labels = random_cifar_like(batch * (batches + 1))
    return training_loader(images, labels, train_transform(recipe, CIFAR_MEAN, CIFAR_STD, "cifar10", 32),
                           recipe, torch.Generator().manual_seed(0), torch.device("cpu"))


def augmentation_through_workers(loader) -> float:
    """Images/s the workers deliver to the training process, no model: the data path's ceiling."""
    batches = iter(loader)
    next(batches)  # the workers' start-up and first batch are not the steady rate
    t0, seen = time.perf_counter(), 0
    for x, _ in batches:
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def measure_augmentation(batch: int, batches: int, rounds: int) -> dict[str, float]:
    loaders = {w: augmentation_loader(batch, batches, w) for w in (1, 2)}
    rates: dict[str, list[float]] = {"in_process": [], "workers1": [], "workers2": []}
    for _ in range(rounds):
        rates["in_process"].append(augmentation_in_process(batch, batches))
        for w, loader in loaders.items():
            rates[f"workers{w}"].append(augmentation_through_workers(loader))
    return {key: statistics.median(r) for key, r in rates.items()}


# ---------------------------------------------------------------- 3. start-up to the first step


# Runs `gmmvit train` in a fresh interpreter and stops it when the first batch reaches the loop (the
# mixer is the loop's first call on a batch): the time from launch covers the interpreter, the
# imports, loading the dataset, its fingerprint, building the model and the loader, and the first
# augmented batch. Loading and fingerprinting are timed apart: they are what grows with the dataset.
FIRST_BATCH_PROBE = r"""
import json, os, sys, time
launched = float(sys.argv[1])
import gmmvit.data as data
import gmmvit.train as train
spent = {"imports": time.time() - launched, "load": 0.0, "fingerprint": 0.0}

def timed(name, fn):
    def run(*args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.time() - t0
    return run

data.load_dataset = timed("load", data.load_dataset)  # the CLI imports it when it runs
data.ImageDataset.fingerprint = timed("fingerprint", data.ImageDataset.fingerprint)

class FirstBatchStops(train.BatchMixer):
    def __call__(self, images, labels):
        spent["total"] = time.time() - launched
        print("FIRST_BATCH " + json.dumps(spent), flush=True)
        os._exit(0)

train.BatchMixer = FirstBatchStops
from gmmvit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def startup_seconds(train_args: list[str], threads: int) -> dict[str, float]:
    """Seconds from launch to the first batch ("total"), and within them "imports", "load" (the
    dataset) and "fingerprint" (hashing it), for one `gmmvit train` launch."""
    env = os.environ | {"GMMVIT_THREADS": str(threads)}
    launched = time.time()
    run = subprocess.run([sys.executable, "-c", FIRST_BATCH_PROBE, str(launched), "train", *train_args],
                         capture_output=True, text=True, env=env, timeout=1800)
    for line in run.stdout.splitlines():
        if line.startswith("FIRST_BATCH "):
            return json.loads(line.removeprefix("FIRST_BATCH "))
    raise RuntimeError(f"gmmvit train never reached its first batch:\n{run.stdout}\n{run.stderr}")


def write_cifar10_format(root: Path, n_train: int = 50_000, n_test: int = 10_000) -> None:
    """cifar-10-batches-py as the official archive unpacks: five pickled training batches, a test
    batch and batches.meta (protocol 2, bytes keys, as Python 2 wrote them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch_file(name: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f, protocol=2)

    per_file = n_train // 5
    for i in range(1, 6):
        batch_file(f"data_batch_{i}", per_file)
    batch_file("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)],
                     b"num_cases_per_batch": per_file, b"num_vis": 3072}, f, protocol=2)


def write_tinyimagenet_format(root: Path, images: int) -> tuple[int, int]:
    """tiny-imagenet-200 as `gmmvit prepare` leaves it: train/<wnid>/images/<wnid>_<i>.JPEG and
    val/<wnid>/val_<i>.JPEG (val sorted into class folders), 64x64 JPEGs of smooth random images
    (noise would compress to 5x the real files' ~2 KB and decode slower). Returns (train, val)."""
    from PIL import Image

    per_class = images // TINY_CLASSES
    n_val = max(1, round(per_class / 11))  # the real 500 : 50 split
    n_train = per_class - n_val
    rng = np.random.default_rng(0)
    folder = root / "tiny-imagenet-200"
    for c in range(TINY_CLASSES):
        wnid = f"n{c:08d}"
        (folder / "train" / wnid / "images").mkdir(parents=True)
        (folder / "val" / wnid).mkdir(parents=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)
            path = (folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG" if i < n_train
                    else folder / "val" / wnid / f"val_{c * n_val + i - n_train}.JPEG")
            image.save(path, quality=75)
    return n_train * TINY_CLASSES, n_val * TINY_CLASSES


def measure_startup(workdir: Path, tiny_images: int, repeats: int, threads: int) -> dict[str, dict]:
    data_root = workdir / "data"
    t0 = time.perf_counter()
    write_cifar10_format(data_root)
    n_train, n_val = write_tinyimagenet_format(data_root, tiny_images)
    print(f"  wrote a CIFAR-10-format set (60,000 images) and a Tiny-ImageNet-format tree "
          f"({n_train:,} train + {n_val:,} val JPEGs) in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--model", "vit", "--mask", "none", "--recipe", "paper", "--data-root", str(data_root),
              "--out", str(workdir / "cell")]
    cifar, tiny = (data_root / folder / CACHE_DIR for folder in ("cifar-10-batches-py", "tiny-imagenet-200"))
    jobs = {  # a dropped cache: this run decodes every image (and writes the cache the next one reads)
        "digits": (["--dataset", "digits"], None),
        "cifar10 format, no cache": (["--dataset", "cifar10"], cifar),
        "cifar10 format, cached": (["--dataset", "cifar10"], None),
        "tinyimagenet format, no cache": (["--dataset", "tinyimagenet"], tiny),
        "tinyimagenet format, cached": (["--dataset", "tinyimagenet"], None),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (args, drop) in jobs.items():
            if drop is not None:
                shutil.rmtree(drop, ignore_errors=True)
            results[name].append(startup_seconds(args + common, threads))
            shutil.rmtree(workdir / "cell", ignore_errors=True)
    summary = {name: {part: statistics.median(run[part] for run in runs) for part in runs[0]}
               for name, runs in results.items()}
    summary["_tiny"] = {"images": n_train + n_val}
    return summary


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per figure and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats")
    parser.add_argument("--aug-batches", type=int, default=40, help="batches per augmentation figure")
    parser.add_argument("--tiny-images", type=int, default=TINY_REAL_IMAGES,
                        help="images in the Tiny-ImageNet-format tree (default: the real 110,000; "
                        "fewer are extrapolated)")
    parser.add_argument("--startup-repeats", type=int, default=2)
    parser.add_argument("--gpu-step-ms", type=float, default=8.0,
                        help="assumed GPU step time of the 2.7M ViT at this batch (bf16, eager); "
                        "replace it with a measured one")
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} training threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start (shared machine: figures are noisy)")
    print(f"batch {args.batch}, 32x32, paper augmentation (CIFAR10 AutoAugment policy)\n")

    print("1. training loop vs model-only step (ViT 2.7M, no mask)", flush=True)
    loop = measure_loop(args.batch, args.steps, args.rounds, [0, 1, 2])
    print("\n| path | images/s | of the model-only step |\n|---|---|---|")
    print(f"| model-only step, float32 | {loop['model']:.1f} | 100% |")
    print(f"| model-only step, bf16 autocast (amp) | {loop['model_bf16']:.1f} | "
          f"{loop['model_bf16'] / loop['model']:.0%} |")
    for w in (0, 1, 2):
        print(f"| full loop, {w} workers | {loop[f'loop{w}']:.1f} | {loop[f'loop{w}'] / loop['model']:.0%} |")

    print("\n2. augmentation alone (no model), paper augmentation", flush=True)
    aug = measure_augmentation(args.batch, args.aug_batches, args.rounds)
    print("\n| where | images/s | per worker | vs 1 worker |\n|---|---|---|---|")
    print(f"| training process, 1 thread | {aug['in_process']:.0f} | - | - |")
    for w in (1, 2):
        print(f"| {w} worker process(es) | {aug[f'workers{w}']:.0f} | {aug[f'workers{w}'] / w:.0f} | "
              f"{aug[f'workers{w}'] / aug['workers1']:.2f}x |")

    if not args.skip_startup:
        print("\n3. job start-up: launch of `gmmvit train` to its first batch (paper recipe, ViT)", flush=True)
        with tempfile.TemporaryDirectory(prefix="gmmvit-startup-") as tmp:
            startup = measure_startup(Path(tmp), args.tiny_images, args.startup_repeats, threads)
        n_tiny = startup.pop("_tiny")["images"]
        scale = TINY_REAL_IMAGES / n_tiny
        print(f"\n| dataset | to first batch, s (median of {args.startup_repeats}) | imports | "
              f"dataset load | fingerprint | extrapolated to {TINY_REAL_IMAGES:,} images |"
              "\n|---|---|---|---|---|---|")
        for name, fig in startup.items():
            extra = ""
            if name.startswith("tinyimagenet") and n_tiny < TINY_REAL_IMAGES:
                # loading and fingerprinting grow with the images; the rest does not
                grows = fig["load"] + fig["fingerprint"]
                extra = f"{fig['total'] + grows * (scale - 1):.1f} s"
            label = f"{name} ({n_tiny:,} images)" if name.startswith("tinyimagenet") else name
            print(f"| {label} | {fig['total']:.1f} | {fig['imports']:.1f} | {fig['load']:.1f} | "
                  f"{fig['fingerprint']:.2f} | {extra} |")

    print("\n4. would the workers keep a GPU busy?")
    gpu_rate = args.batch / (args.gpu_step_ms / 1000)
    # One worker's rate is one core's: on a GPU node each worker has its own core; here the 2 cores
    # are shared with the training process (and whatever else runs), so 2 workers may not double it.
    per_worker = aug["workers1"]
    print(f"assumed GPU step: {args.gpu_step_ms:g} ms at batch {args.batch} = {gpu_rate:,.0f} images/s "
          "(an assumption for a current data-centre GPU, bf16; not measured here)")
    for w in (1, 2, 4, 8):
        supply = per_worker * w
        verdict = "keeps it busy" if supply >= gpu_rate else f"GPU waits {1 - supply / gpu_rate:.0%} of the time"
        print(f"  {w} worker(s): about {supply:,.0f} images/s -> {verdict}"
              + ("" if w <= 2 else " (extrapolated from the per-worker rate)"))
    print(f"  workers needed: {math.ceil(gpu_rate / per_worker)} at {per_worker:,.0f} images/s per worker "
          "(one CPU core each, besides the training process's)")


if __name__ == "__main__":
    main()
