"""Re-train the cells of a committed results folder and compare them with it, digit for digit.

``gmmvit verify RESULTS_DIR [--cells PATTERN ...] [--max N] [--jobs J] [--scratch DIR]``

Reads RESULTS_DIR/table.csv (one row per cell: identity, resolved recipe, numerics, the sha256 of
the final weights, provenance) and RESULTS_DIR/history.csv (every epoch of every cell), trains each
chosen cell again with ``gmmvit train`` (a process per cell, so that its numerics are set before
torch loads) into a scratch folder, and compares every epoch's train loss, validation and test
loss and top-1 and learning rate, and the weights' sha256. Prints ``reproduced k/n``; for each cell
that differs, the first epoch and column that differ and both records' provenance side by side,
what differs marked. Exit 0 when every cell reproduced, 1 when one did not, 2 on a usage error.

Needs no torch itself: the cells run in their own processes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from .report import flat_record

IDENTITY = ["recipe", "dataset", "model", "mask", "seed"]
COMPARED = ["train_loss", "val_loss", "val_top1", "test_loss", "test_top1", "lr"]  # not images_per_s
# What a reader needs to explain a difference, in the order shown.
PROVENANCE = ["numerics", "cpu_vendor", "cpu_model_name", "cpu_family", "cpu_model", "cpu_stepping",
              "cpu_flags", "cpu_l2_kib", "cpu_l3_kib", "cpu_capability", "mkl_branch", "threads",
              "kernel_environment", "device", "torch_version", "timm_version", "mkl_version",
              "onednn_version", "python_version", "source_hash", "dataset_fingerprint", "weights_sha256"]
REGISTERED = ("digits", "cifar10", "cifar100", "svhn", "tinyimagenet")


class VerifyError(ValueError):
    """A usage error: a folder without what verify needs, a pattern that matches nothing."""


def cell_name(cell: pd.Series | dict) -> str:
    """"demo/digits/vit-gmm/seed0": the cell's path under runs/ (what --cells patterns match)."""
    return f"{cell['recipe']}/{cell['dataset']}/{cell['model']}-{cell['mask']}/seed{int(cell['seed'])}"


def load_committed(results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table_path, history_path = results / "table.csv", results / "history.csv"
    for path in (table_path, history_path):
        if not path.is_file():
            raise VerifyError(f"{path} not found: verify needs a results folder written by "
                              "`gmmvit report` (table.csv and history.csv)")
    table, history = pd.read_csv(table_path), pd.read_csv(history_path)
    missing = [c for c in [*IDENTITY, "recipe_config"] if c not in table]
    if missing:
        raise VerifyError(f"{table_path} has no {', '.join(missing)} column: written by older code")
    return table, history


def choose(table: pd.DataFrame, patterns: list[str] | None, most: int | None) -> pd.DataFrame:
    names = table.apply(cell_name, axis=1)
    chosen = table
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]
        if unmatched:
            raise VerifyError(f"--cells {', '.join(unmatched)} matches no cell; cells are named like "
                              f"{names.iloc[0]} (glob patterns: 'demo/digits/vit-*/seed0')")
        chosen = table[[any(fnmatch.fnmatch(n, p) for p in patterns) for n in names]]
    return chosen.head(most) if most else chosen


def train_command(cell: pd.Series, out: Path, data_root: str, paths: dict[str, str]) -> list[str]:
    """`gmmvit train` for the cell with its recorded, fully resolved recipe and numerics."""
    dataset = cell["dataset"]
    command = [sys.executable, "-m", "gmmvit.cli", "train", "--dataset", dataset, "--model", cell["model"],
               "--mask", cell["mask"], "--seed", str(int(cell["seed"])), "--recipe", "paper",
               "--overrides", cell["recipe_config"], "--recipe-name", cell["recipe"],
               "--threads", "1", "--out", str(out), "--keep-checkpoint", "no"]
    if isinstance(cell.get("numerics"), str):
        command += ["--numerics", cell["numerics"]]
    else:
        command += ["--numerics", "native"]  # older records: their kernels were the native ones
    if dataset in paths:
        size = cell.get("img_size")
        command += ["--dataset-kind", "folder", "--dataset-path", paths[dataset]]
        command += ["--img-size", str(int(size))] if pd.notna(size) else []
    elif dataset in REGISTERED:
        command += ["--data-root", data_root]
    else:
        raise VerifyError(f"cell {cell_name(cell)}: {dataset} is an image folder; say where it is "
                          f"with --dataset-path {dataset}=<its train/ + test/ tree>")
    return command


def _same(a: object, b: object) -> bool:
    if pd.isna(a) and pd.isna(b):
        return True
    if pd.isna(a) or pd.isna(b):
        return False
    return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=0.0)


def first_difference(committed: pd.DataFrame, fresh: pd.DataFrame) -> str | None:
    """The first epoch and column where the two histories differ, or None."""
    if len(committed) != len(fresh):
        return f"{len(fresh)} epochs against {len(committed)} committed"
    for (_, old), (_, new) in zip(committed.iterrows(), fresh.iterrows()):
        for column in COMPARED:
            if not _same(old.get(column), new.get(column)):
                return f"epoch {int(old['epoch'])}: {column} {new.get(column)} against {old.get(column)} committed"
    return None


def side_by_side(committed: pd.Series, fresh: dict) -> list[str]:
    lines = [f"    {'':22} {'committed':40} {'this run':40}"]
    for key in PROVENANCE:
        old, new = committed.get(key), fresh.get(key)
        old_text = "unknown" if old is None or (isinstance(old, float) and math.isnan(old)) else str(old)
        new_text = "unknown" if new is None else str(new)
        if key.startswith("cpu_") and old_text.endswith(".0") and old_text[:-2] == new_text:
            old_text = new_text  # a CSV reads integers with a missing value as floats
        mark = "≠" if old_text != new_text else " "
        lines.append(f"  {mark} {key:22} {old_text[:40]:40} {new_text[:40]:40}")
    return lines


def verify_cell(cell: pd.Series, history: pd.DataFrame, scratch: Path, data_root: str,
                paths: dict[str, str]) -> tuple[bool, list[str]]:
    name = cell_name(cell)
    out = scratch / name
    log = scratch / "logs" / f"{name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as sink:
        code = subprocess.run(train_command(cell, out, data_root, paths), stdout=sink,
                              stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        return False, [f"✗ {name}: training failed (exit {code}, log {log}):", *(f"    {t}" for t in tail)]
    mine = history
    for key in IDENTITY:
        mine = mine[mine[key].astype(str) == str(cell[key])]
    mine = mine.sort_values("epoch")
    fresh_history = pd.read_csv(out / "history.csv")
    fresh = flat_record(json.loads((out / "metrics.json").read_text()))
    problems = []
    if len(mine) == 0:
        problems.append("the committed history.csv has no epochs of this cell")
    elif (where := first_difference(mine, fresh_history)) is not None:
        problems.append(f"history differs from {where}")
    committed_sha = cell.get("weights_sha256")
    if not isinstance(committed_sha, str):
        problems.append("the committed record keeps no weights sha256 (older code): compared the history only")
        reproduced = len(problems) == 1
    else:
        if committed_sha != fresh.get("weights_sha256"):
            problems.append(f"final weights differ (sha256 {fresh.get('weights_sha256', '')[:16]} "
                            f"against {committed_sha[:16]} committed)")
        reproduced = not problems
    if reproduced:
        return True, [f"✓ {name}: every epoch and the final weights equal ({seconds:.0f} s)"
                      + (f"; note: {problems[0]}" if problems else "")]
    return False, [f"✗ {name}: " + "; ".join(problems) + f" ({seconds:.0f} s)", *side_by_side(cell, fresh)]


def verify(results: Path, patterns: list[str] | None = None, most: int | None = None, jobs: int = 1,
           scratch: Path | None = None, data_root: str = "data", paths: dict[str, str] | None = None,
           log=print) -> tuple[int, int]:
    """(reproduced, checked) for the chosen cells of ``results``."""
    table, history = load_committed(results)
    chosen = choose(table, patterns, most)
    paths = paths or {}
    for _, cell in chosen.iterrows():
        train_command(cell, Path("."), data_root, paths)  # a folder without a path: refused up front
    scratch = Path(scratch or tempfile.mkdtemp(prefix="gmmvit-verify-"))
    log(f"verifying {len(chosen)} of {len(table)} cells of {results} ({jobs} at a time), "
        f"re-trained under {scratch}")
    done = 0

    def one(cell: pd.Series) -> tuple[bool, list[str]]:
        nonlocal done
        result = verify_cell(cell, history, scratch, data_root, paths)
        done += 1
        log(f"[{done}/{len(chosen)}] " + "\n".join(result[1]))
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(one, [cell for _, cell in chosen.iterrows()]))
    reproduced = sum(ok for ok, _ in outcomes)
    log(f"reproduced {reproduced}/{len(chosen)}")
    return reproduced, len(chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmvit verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results folder written by `gmmvit report` (e.g. results)")
    parser.add_argument("--cells", nargs="+", metavar="PATTERN",
                        help="only cells whose name matches (glob), e.g. 'demo/digits/vit-*/seed0'")
    parser.add_argument("--max", type=int, metavar="N", help="at most N cells (the first, in table order)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="cells trained at once, one thread each (default: one per CPU)")
    parser.add_argument("--scratch", help="where the cells are re-trained (default: a new temporary folder)")
    parser.add_argument("--data-root", default="data", help="where registered datasets are (as the workflow's)")
    parser.add_argument("--dataset-path", action="append", default=[], metavar="NAME=PATH",
                        help="an image-folder dataset's tree, by the name its cells carry")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.max is not None and ns.max < 1:
            raise VerifyError(f"--max must be >= 1, got {ns.max}")
        if ns.jobs < 1:
            raise VerifyError(f"--jobs must be >= 1, got {ns.jobs}")
        paths = {}
        for item in ns.dataset_path:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise VerifyError(f"--dataset-path {item!r}: expected NAME=PATH")
            paths[name] = path
        reproduced, checked = verify(Path(ns.results), ns.cells, ns.max, ns.jobs,
                                     Path(ns.scratch) if ns.scratch else None, ns.data_root, paths)
    except VerifyError as err:
        print(f"gmmvit verify: error: {err}", file=sys.stderr)
        return 2
    return 0 if reproduced == checked else 1


if __name__ == "__main__":
    sys.exit(main())
