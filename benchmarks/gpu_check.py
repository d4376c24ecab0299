"""Is the GPU path right, and how fast is it? One command on a machine with a CUDA GPU, sized for at
most about 8 minutes (an estimate: it has not run on a GPU yet):

    python benchmarks/gpu_check.py          # writes results/gpu-check/report.md and gpu-check.json

1. the cuda test suite, ``pytest -m cuda tests/test_cuda.py``: every model x {none, gmm, elm, rmt,
   gpsa} on CUDA against the CPU, torch's flex_attention against the explicit path, a cell killed
   mid-epoch and resumed, bf16 autocast and TF32 cells, data workers with pinned memory, device slots;
2. one epoch of the paper recipe (3 passes, batch 128, its whole augmentation, float32) for ViT with
   no mask, GMM and ELM, on CIFAR-shaped random images held in memory: images/s, peak GPU memory,
   the share of the loop spent waiting for data, and each cell's step time over the unmasked one's;
3. the report, printed and written as Markdown and JSON with the device, driver, torch and CUDA
   versions. It is rewritten after each stage, so a run cut short keeps what it measured.

Exit status 0 when every cuda test passed and every cell trained, 1 otherwise, 2 without a CUDA
device (one line, no traceback). README "On a GPU" shows the report's format (tests/test_cuda.py
holds the two equal).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_SUITE = ["-m", "pytest", "-m", "cuda", "-v", "-rfEs", "--durations=15", "-p", "no:cacheprovider",
              "tests/test_cuda.py"]
MASKS = ("none", "gmm", "elm")
FLEX_NOT_YET = "not implemented yet"  # the flex_attention path for "mul" masks (issue 20, deferred)


def default_workers() -> int:
    """Data workers for a GPU job: 8 where the cores allow (README "Speed": one worker supplies
    about 3,200 images/s of the paper's augmentation, a ViT step on a current GPU takes 16,000),
    leaving two cores to the training process."""
    return max(2, min(8, (os.cpu_count() or 4) - 2))


# ---------------------------------------------------------------- the report


def format_report(report: dict) -> str:
    """The report as Markdown: what report.md holds and the command prints."""
    d, tests, run = report["device"], report["tests"], report["training"]
    lines = ["# GPU check", "",
             f"{d['name']} ({d['memory_gib']:.0f} GiB, compute capability {d['capability']}), driver "
             f"{d['driver']}, torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}; {report['date']}", ""]
    if tests is None:
        lines.append("cuda tests: not run")
    else:
        lines.append(f"cuda tests (`pytest -m cuda tests/test_cuda.py`): {tests['passed']} passed, "
                     f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"in {tests['seconds']:.0f} s")
        lines += [f"- failed: {name}" for name in tests["failures"]]
    lines += ["", f"One epoch of the paper recipe ({run['passes']} passes over {run['train_images']:,} "
                  f"CIFAR-shaped random images, batch {run['batch_size']}, float32, {run['workers']} data "
                  "workers), ViT:", "",
              "| cell | img/s | peak GPU memory | waiting for data | step time over none's, explicit path "
              "| the same, flex path |",
              "|---|---|---|---|---|---|"]
    for cell in report["cells"]:
        name = f"{cell['model']}-{cell['mask']}"
        if cell.get("error"):
            lines.append(f"| {name} | failed: {cell['error']} | | | | |")
            continue
        over_none = "—" if cell["over_none"] is None else f"{cell['over_none']:.2f}x"
        flex = "—" if cell["mask"] == "none" else (FLEX_NOT_YET if cell["over_none_flex"] is None
                                                   else f"{cell['over_none_flex']:.2f}x")
        lines.append(f"| {name} | {cell['images_per_s']:,.0f} | {cell['peak_gpu_memory_gib']:.2f} GiB | "
                     f"{cell['data_wait_share']:.0%} | {over_none} | {flex} |")
    if not report["cells"]:
        lines.append("| not run | | | | | |")
    return "\n".join(lines) + "\n"


# Invented numbers: README shows what format_report makes of them.
EXAMPLE_REPORT = {
    "date": "YYYY-MM-DD",
    "device": {"name": "Example GPU", "memory_gib": 80, "capability": "9.0", "driver": "000.00.00",
               "torch": "2.x.y", "cuda": "12.x", "cudnn": "9xxxx"},
    "tests": {"passed": 34, "failed": 1, "errors": 0, "skipped": 1, "seconds": 240,
              "failures": ["tests/test_cuda.py::test_an_example_that_failed"]},
    "training": {"passes": 3, "train_images": 50000, "batch_size": 128, "workers": 8},
    "cells": [
        {"model": "vit", "mask": "none", "images_per_s": 10000.0, "peak_gpu_memory_gib": 1.0,
         "data_wait_share": 0.02, "over_none": 1.0, "over_none_flex": None},
        {"model": "vit", "mask": "gmm", "images_per_s": 5000.0, "peak_gpu_memory_gib": 2.0,
         "data_wait_share": 0.01, "over_none": 2.0, "over_none_flex": None},
        {"model": "vit", "mask": "elm", "images_per_s": 5000.0, "peak_gpu_memory_gib": 2.0,
         "data_wait_share": 0.01, "over_none": 2.0, "over_none_flex": None},
    ],
}


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    texts = {"report.md": format_report(report), "gpu-check.json": json.dumps(report, indent=2) + "\n"}
    for name, text in texts.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)  # a reader sees the old file or the new one


# ---------------------------------------------------------------- the device


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def describe_device() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "driver": driver_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": str(torch.backends.cudnn.version()),
            "visible_devices": torch.cuda.device_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


# ---------------------------------------------------------------- 1. the cuda suite


def run_cuda_suite(out: Path, timeout_s: float) -> dict:
    """``pytest -m cuda`` in a process of its own, its output streamed to cuda-tests.log (kept
    whole if it runs out of time) and its results to cuda-tests.xml, beside the report."""
    xml, log = out / "cuda-tests.xml", out / "cuda-tests.log"
    xml.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as sink:
        suite = subprocess.Popen([sys.executable, *CUDA_SUITE, f"--junitxml={xml}"], cwd=ROOT, stdout=sink,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = suite.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(suite.pid, signal.SIGKILL)  # pytest and the training jobs it started
            suite.wait()
            code = None
    print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), end="", flush=True)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed" if case.find("failure") is not None else "errors"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    if code is None:
        counts["failures"].append(f"the suite ran out of its {timeout_s:.0f} s (see cuda-tests.log)")
    elif code != 0 and not counts["failures"]:
        counts["failures"].append(f"pytest exited {code} (see cuda-tests.log)")
    return counts | {"seconds": time.perf_counter() - t0, "exit_code": code}


# ---------------------------------------------------------------- 2. the paper recipe, one epoch


class TimedLoader:
    """The training loader, timed: seconds the loop spent in ``next()`` waiting for a batch, and the
    loop's seconds, from the first batch in hand (the workers' start-up is not counted) to the last.
    A bound on the GPU's idle share: the GPU may still run queued steps while the loop waits."""

    def __init__(self, loader) -> None:
        self.loader, self.waited, self.span = loader, 0.0, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches, start = iter(self.loader), None
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            if start is None:
                start = time.perf_counter()
            else:
                self.waited += time.perf_counter() - t0
            yield batch
        if start is not None:
            self.span += time.perf_counter() - start


def cifar_shaped(n_train: int, n_test: int):
    from gmmvit.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        name="cifar-shaped", num_classes=10, autoaugment="cifar10", classes=tuple(str(i) for i in range(10)),
        train_images=torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_labels=torch.arange(n_train) % 10,
        test_images=torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        test_labels=torch.arange(n_test) % 10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    )


def train_one_epoch(mask: str, data, workers: int, workdir: Path) -> dict:
    """One epoch of the paper recipe for ViT with ``mask``, through gmmvit.train.train_cell."""
    import gmmvit.train as train
    from gmmvit.recipe import BUILTIN_RECIPES

    timed: list[TimedLoader] = []
    real_loader = train.training_loader

    def timed_loader(*args, **kwargs):
        timed.append(TimedLoader(real_loader(*args, **kwargs)))
        return timed[-1]

    recipe = BUILTIN_RECIPES["paper"].replace(epochs=1, workers=workers)
    gc.collect()  # the last cell's loader and its workers
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train.training_loader = timed_loader
    try:
        record = train.train_cell(train.Cell(data.name, "vit", mask, 0, "paper"), recipe, workdir / f"vit-{mask}",
                                  dataset=data, progress=False, numerics="native")
    finally:
        train.training_loader = real_loader
    clock = timed[0]
    return {"model": "vit", "mask": mask, "images_per_s": record["train_images_per_s"],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "data_wait_share": clock.waited / clock.span if clock.span else 0.0,
            "train_loss": record["final_train_loss"], "device_recorded": record["device"],
            "over_none": None, "over_none_flex": None}


def set_over_none(cells: list[dict]) -> None:
    """Each cell's step time over the unmasked cell's (its images/s under none's), where both trained."""
    none = next((c for c in cells if c["mask"] == "none" and not c.get("error")), None)
    for cell in cells:
        if none is not None and not cell.get("error"):
            cell["over_none"] = none["images_per_s"] / cell["images_per_s"]


# ---------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check")
    parser.add_argument("--train-images", type=int, default=50_000, help="CIFAR's 50,000 by default")
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"data workers of the paper cells (default here: {default_workers()})")
    parser.add_argument("--tests-timeout", type=float, default=420, help="seconds the cuda suite may take")
    parser.add_argument("--skip-tests", action="store_true", help="only the paper-recipe epoch")
    parser.add_argument("--skip-training", action="store_true", help="only the cuda suite")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda or 'none, a CPU-only build'}) "
              "sees no GPU here; run this on a machine with one", file=sys.stderr)
        return 2

    from gmmvit.recipe import BUILTIN_RECIPES

    paper = BUILTIN_RECIPES["paper"]
    report = {"date": datetime.date.today().isoformat(), "device": describe_device(), "tests": None,
              "training": {"passes": paper.passes_per_epoch, "train_images": args.train_images,
                           "test_images": args.test_images, "batch_size": paper.batch_size,
                           "workers": args.workers},
              "cells": []}
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(report, args.out)
    if not args.skip_tests:
        print(f"1. the cuda test suite ({' '.join(CUDA_SUITE[1:])}) ...", flush=True)
        report["tests"] = run_cuda_suite(args.out, args.tests_timeout)
        write_report(report, args.out)
    if not args.skip_training:
        print(f"2. one epoch of the paper recipe for vit x {', '.join(MASKS)} ...", flush=True)
        data = cifar_shaped(args.train_images, args.test_images)
        workdir = Path(tempfile.mkdtemp(prefix="gmmvit-gpu-check-"))  # the cells' outputs: not kept
        try:
            for mask in MASKS:
                try:
                    cell = train_one_epoch(mask, data, args.workers, workdir)
                except Exception as err:  # noqa: BLE001 - a failed cell is reported, the others still run
                    traceback.print_exc()
                    cell = {"model": "vit", "mask": mask, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
                report["cells"].append(cell)
                set_over_none(report["cells"])
                write_report(report, args.out)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    text = format_report(report)
    print("\n" + text, end="")
    print(f"written: {args.out / 'report.md'}, {args.out / 'gpu-check.json'}")
    tests_ok = report["tests"] is None or (report["tests"]["exit_code"] == 0)
    return 0 if tests_ok and not any(c.get("error") for c in report["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
