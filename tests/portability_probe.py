"""Train a smoke-sized cell per attention path and write what it computed to OUT/probe.json: the program that
tests/test_numerics.py runs on this CPU and on emulated CPUs of other makes (emulate-cpu).

    python tests/portability_probe.py --numerics portable --out DIR [--masks none,gmm,rmt]

A tiny ViT (width 32, 2 blocks, 4 heads) through the real pipeline: the digits, the smoke recipe's
augmentation (flip, crop, AutoAugment, random erasing, CutMix / MixUp), AdamW, the schedule,
gradient clipping and evaluation, for each mask: none (the fused attention kernel), gmm (a "mul"
mask: the explicit path) and rmt (an "add" mask: a bias through the fused kernel's attn_mask).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gmmvit import numerics

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 4}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numerics", choices=numerics.NUMERICS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--masks", default="none,gmm,rmt")
    args = parser.parse_args()
    numerics.apply_environment(args.numerics)  # before torch loads, as `gmmvit train` does

    from gmmvit.data import load_dataset
    from gmmvit.recipe import resolve_recipe
    from gmmvit.train import Cell, train_cell

    data = load_dataset("digits")
    # 3 steps of 16 images (48 train + 16 held out), evaluated on 16 + 16: enough to tell kernels
    # apart, small enough for an emulated CPU (about 30 s a cell there, 1 s here)
    recipe = resolve_recipe("smoke").replace(epochs=1, limit_train=64, limit_test=16)
    results = {}
    for mask in args.masks.split(","):
        out = Path(args.out, mask)
        record = train_cell(Cell("digits", "vit", mask, 0, "smoke"), recipe, out, dataset=data,
                            progress=False, numerics=args.numerics, threads=1,
                            model_overrides=TINY_VIT)
        results[mask] = {"history": (out / "history.csv").read_text(),
                         "weights_sha256": record["weights_sha256"],
                         "cpu": record["cpu"], "cpu_capability": record["cpu_capability"],
                         "mkl_branch": record["mkl_branch"]}
    Path(args.out, "probe.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
