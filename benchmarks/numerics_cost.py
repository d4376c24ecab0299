"""What portable numerics cost: a training step of every model under native and portable, one run.

    python benchmarks/numerics_cost.py                       # 5 models x mask none, batch 16 and 128
    python benchmarks/numerics_cost.py --masks none gmm --batches 16

Each (model, mask, batch, numerics) is timed in a fresh process (the numerics are set before torch
loads, as `gmmvit train` does), one thread, eager, with the optimiser a cell of that numerics uses
(fused AdamW under portable). Processes are interleaved over the repeats (this machine is noisy):
compare the ratios of one run. The step is the model's alone (a fixed batch, no data path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(model_name: str, mask: str, batch: int, numerics_name: str, steps: int) -> None:
    from gmmvit import numerics

    numerics.apply_environment(numerics_name)
    import torch

    from gmmvit.models import build_model
    from gmmvit.recipe import BUILTIN_RECIPES, build_optimizer

    numerics.configure(numerics_name, "cpu", 1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_name, mask=mask, img_size=32, num_classes=10).train()
    optimizer = build_optimizer(model, BUILTIN_RECIPES["demo"], fused=numerics_name == "portable")
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    step(), step()  # warm-up: allocator, first calls
    print("CHILD " + json.dumps({"seconds": statistics.median(step() for _ in range(steps)),
                                 "capability": torch.backends.cpu.get_cpu_capability(),
                                 "mkl": numerics.mkl_branch()}), flush=True)


def timed(model: str, mask: str, batch: int, numerics_name: str, steps: int) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", model, mask, str(batch), numerics_name,
                          str(steps)], capture_output=True, text=True, check=False)
    for line in run.stdout.splitlines():
        if line.startswith("CHILD "):
            return json.loads(line.removeprefix("CHILD "))
    raise RuntimeError(f"timing {model} x {mask} ({numerics_name}) failed:\n{run.stdout}\n{run.stderr}")


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        model, mask, batch, numerics_name, steps = sys.argv[2:]
        return child(model, mask, int(batch), numerics_name, int(steps))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "swin", "cait", "pit", "t2t"])
    parser.add_argument("--masks", nargs="+", default=["none"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--repeats", type=int, default=2, help="processes per cell, interleaved")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (median taken)")
    args = parser.parse_args()

    from gmmvit.numerics import cpu_facts, cpu_label

    print(f"CPU {cpu_label(cpu_facts())}; one thread, eager, 32x32; each cell in its own process, "
          f"{args.repeats} interleaved processes x {args.steps} steps", flush=True)
    cells = [(m, k, b) for b in args.batches for m in args.models for k in args.masks]
    times: dict = {(cell, n): [] for cell in cells for n in ("native", "portable")}
    kernels: dict = {}
    for _ in range(args.repeats):
        for cell in cells:
            for numerics_name in ("native", "portable"):
                result = timed(*cell, numerics_name, args.steps)
                times[cell, numerics_name].append(result["seconds"])
                kernels[numerics_name] = f"ATen {result['capability']}, MKL {result['mkl']}"
    print(f"native: {kernels['native']}; portable: {kernels['portable']}\n")
    print("| model | mask | batch | native img/s | portable img/s | portable / native step time |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for model, mask, batch in cells:
        native = statistics.median(times[(model, mask, batch), "native"])
        portable = statistics.median(times[(model, mask, batch), "portable"])
        ratios.append(portable / native)
        print(f"| {model} | {mask} | {batch} | {batch / native:.1f} | {batch / portable:.1f} | "
              f"{portable / native:.2f} |")
    print(f"\nportable / native step time: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
