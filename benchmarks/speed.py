"""Training-step speed of every model x mask, against a 2048x2048 float32 matmul, in one run.

    python benchmarks/speed.py                 # all models x {none, gmm, elm}, batch 128, 32x32
    python benchmarks/speed.py --models vit --loop   # + the full training loop vs the model alone
    python benchmarks/speed.py --masks none gpsa     # a family's cost over none, every model
    python benchmarks/speed.py --compile       # each cell eager and under torch.compile (recipe key)
    python benchmarks/speed.py --device cuda   # on a GPU (the matmul too)
    python benchmarks/data_path.py             # the data path: workers, augmentation, start-up

Each model x mask is timed in a process of its own, as a training job runs it: in one process the
cells share one heap, and the large attention logits of one model change what the allocator does
for the next (in-process runs gave GMM-PiT / PiT anywhere from 1.14 to 1.72 and GMM-CaiT / CaiT
0.86). Repeats are interleaved (model A, B, C, A, B, C, ..., a fresh process each time) and medians
reported, because this machine is noisy: ratios from one run are what to compare. Train FLOPs ~ 6 x
forward MACs per image (fvcore, attention products included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from gmmvit.complexity import macs_all_operators
from gmmvit.models import build_model


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU op has finished)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(n: int = 2048, device: torch.device = torch.device("cpu")) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    synchronize(device)
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - t0


def make_step(model_name: str, mask: str, batch: int, img: int, amp: bool = False, compile: bool = False,
              device: torch.device = torch.device("cpu")):
    """A model-only training step on a fixed batch (no data path); ``amp``: under bf16 autocast;
    ``compile``: through ``torch.compile(model)``, as the recipe key ``compile`` trains."""
    from gmmvit.train import autocast

    torch.manual_seed(0)
    model = build_model(model_name, mask=mask, img_size=img, num_classes=10).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, img, img).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    forward = torch.compile(model) if compile else model

    def step() -> float:
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - t0

    step()  # warm-up: allocator, first-call overheads (and the compiling)
    return model, step


def loop_images_per_s(batch: int, steps: int) -> float:
    """The real training loop (paper augmentation + mixing) for ViT on digits-sized random data."""
    from torch.utils.data import DataLoader, RandomSampler

    from gmmvit.recipe import BUILTIN_RECIPES, BatchMixer, soft_cross_entropy, train_transform
    from gmmvit.batches import AugmentedImages

    recipe = BUILTIN_RECIPES["paper"]
    torch.manual_seed(0)
    model = build_model("vit", img_size=32, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randint(0, 256, (batch * (steps + 1), 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (len(images),))
    data = AugmentedImages(images, labels, train_transform(recipe, (0.5,) * 3, (0.25,) * 3, "cifar10", 32))
    loader = DataLoader(data, batch_size=batch, sampler=RandomSampler(data), drop_last=True)
    mixer = BatchMixer(recipe, 10)
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 1:  # the first step is warm-up
            t0, seen = time.perf_counter(), 0
        x, target = mixer(x, y)
        loss = soft_cross_entropy(model(x), target, recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def time_in_own_process(model: str, mask: str, path: str, device: str, batch: int, steps: int,
                        macs: bool) -> dict[str, float]:
    """Median step seconds of ``model`` x ``mask`` on ``path`` (eager or compiled) over ``steps``
    steps (after 2 warm-up steps) in a fresh Python process, and its forward MACs per image when
    ``macs``."""
    run = subprocess.run([sys.executable, __file__, "--child", model, mask, path, device, str(batch),
                          str(steps), str(int(macs))], capture_output=True, text=True, check=False)
    for line in run.stdout.splitlines():
        if line.startswith("CHILD "):
            return json.loads(line.removeprefix("CHILD "))
    raise RuntimeError(f"timing {model} x {mask} ({path}) failed:\n{run.stdout}\n{run.stderr}")


def child(model_name: str, mask: str, path: str, device: str, batch: int, steps: int, macs: bool) -> None:
    model, step = make_step(model_name, mask, batch, 32, compile=path == "compiled", device=torch.device(device))
    step()  # a second warm-up step: the first one after make_step's still allocates
    seconds = statistics.median(step() for _ in range(steps))
    result = {"seconds": seconds, "macs": macs_all_operators(model.cpu().eval(), 32) if macs else 0,
              "pid": os.getpid()}  # printed: each cell's own process, checkable
    print("CHILD " + json.dumps(result), flush=True)


def main() -> None:
    if len(sys.argv) == 9 and sys.argv[1] == "--child":
        model, mask, path, device, batch, steps, macs = sys.argv[2:]
        return child(model, mask, path, device, int(batch), int(steps), bool(int(macs)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "swin", "cait", "pit", "t2t"])
    parser.add_argument("--masks", nargs="+", default=["none", "gmm", "elm"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="processes per model x mask, interleaved")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (median taken)")
    parser.add_argument("--loop", action="store_true", help="also time the full ViT training loop")
    parser.add_argument("--compile", action="store_true",
                        help="time every cell eager and compiled (torch.compile), interleaved")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (--loop: CPU only)")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch}, 32x32; each model x mask "
          f"in its own process, {args.repeats} interleaved processes x {args.steps} steps; this process "
          f"{os.getpid()}", flush=True)

    paths = ["eager", "compiled"] if args.compile else ["eager"]
    cells = [(m, k, path) for m in args.models for k in args.masks for path in paths]
    times: dict = {key: [] for key in cells}
    pids: dict = {key: [] for key in cells}
    macs: dict = {}
    mm: list[float] = []
    for repeat in range(args.repeats):  # interleaved, so drift hits every cell alike
        mm.append(matmul_seconds(device=device))
        for key in cells:
            result = time_in_own_process(*key, args.device, args.batch, args.steps,
                                         macs=repeat == 0 and key[2] == "eager")
            times[key].append(result["seconds"])
            pids[key].append(result["pid"])
            if result["macs"]:
                macs[key[:2]] = result["macs"]
    mm_rate = 2 * 2048**3 / statistics.median(mm)
    print(f"matmul 2048^2 float32 on {where}: {mm_rate / 1e9:.1f} GFLOP/s (median of {args.repeats})\n")
    print("| model | mask | path | step s | images/s | vs none | vs none, each process | vs eager "
          "| train GFLOP/s | of matmul | processes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, k, path), ts in times.items():
        t = statistics.median(ts)
        base_times = times[(m, args.masks[0], path)]  # the first mask listed (none) on the same path
        each = ", ".join(f"{a / b:.2f}" for a, b in zip(ts, base_times))
        vs_eager = t / statistics.median(times[(m, k, "eager")])
        rate = 6 * macs[(m, k)] * args.batch / t
        print(f"| {m} | {k} | {path} | {t:.5f} | {args.batch / t:.1f} | "
              f"{t / statistics.median(base_times):.2f} | {each} | {vs_eager:.2f} | {rate / 1e9:.1f} | "
              f"{rate / mm_rate:.0%} | {' '.join(map(str, pids[(m, k, path)]))} |")
    if args.loop:
        vit = times.get(("vit", "none", "eager"))
        model_only = args.batch / statistics.median(vit) if vit else None
        loop = loop_images_per_s(args.batch, steps=args.repeats * args.steps)
        print(f"\nViT full training loop (paper augmentation + mixing): {loop:.1f} images/s"
              + (f" = {loop / model_only:.0%} of the model-only step" if model_only else ""))


if __name__ == "__main__":
    main()
