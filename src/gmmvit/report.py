"""Cells -> results tables and plots.

Reads only the cells' records (metrics.json, and the history.csv beside each) and the measure JSONs
of ``gmmvit measure``; every number in a table or plot is a function of those. Writes:

  table.md        the headline: test top-1 at the SELECTED epoch (``selected_top1``: best validation
                  top-1 on a split held out from the training set, or, when the recipe holds out
                  none, the best test epoch, as the paper does: optimistic); its heading says which
  table_best.md   the best test epoch (the paper's figure), beside the paper's published numbers
  table_last.md   the last epoch
  table.csv       tidy: one row per cell, every field of its record, its measure, the paper's figure
  history.csv     every epoch of every cell, keyed by cell (what `gmmvit verify` compares with)
  plots/          accuracy.png, paired_difference.png, learning_curves.png, vs_paper.png;
                  kernels.png (accuracy against K) when the cells include K variants (gmm-k3, ...);
                  masks/<model>-<mask>.png: what each masked model learned (seed 0, the first
                  dataset), rebuilt from the cell's mask_params.pt

What a cell of the markdown tables claims, and no more:

- n >= 2 seeds: mean ± std over the seeds that learned (n=...). The difference to the unmasked model
  of the same family is paired by seed (only seeds present, and learned, in both) and shown as
  [mean difference ± half-width of its 95% t-interval, n-1 degrees of freedom].
- one seed: the value and "(n=1)"; no difference is claimed.
- a cell whose record says it did not learn (``learned: false``: train loss stayed at ln C or top-1
  near chance) is flagged ✗, left out of every mean, and no difference is computed for or against it.

Every table opens with the provenance a reviewer needs (selection, device and CPU capability, hosts,
SLURM jobs with their nodes and granted CPUs, GPU ids and device slots, library versions, source hashes, dataset fingerprints, determinism, split sizes, wall
time), and says prominently when cells differ in any of them ("⚠ mixed") or come from records
written before these fields existed ("⚠ provenance incomplete": such a record's selected epoch is
its best test epoch).

``gmmvit report RUN... --out-dir DIR [--measures PATH...] [--reference CSV] [--grid NAME]``
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from .numerics import cpu_label  # torch-free: the tables still need no torch

if TYPE_CHECKING:  # the tables need no torch; only the mask figures import it, when drawn
    from .masks import LocalityMask

IDENTITY = ["recipe", "dataset", "model", "mask", "seed"]
# Display order and names: the paper's table order first; unknown names (a new registry entry)
# follow in order of appearance, under their own name.
MODEL_NAMES = {"vit": "ViT", "swin": "Swin", "cait": "CaiT", "pit": "PiT", "t2t": "T2T"}
MASK_NAMES = {"none": "", "gmm": "GMM", "elm": "ELM", "rmt": "RMT", "gmm_add": "GMM-add",
              "gmm_official": "GMM-official", "alibi2d": "ALiBi-2D", "lsa": "LSA", "temperature": "Temp"}
DATASET_NAMES = {"digits": "Digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN",
                 "tinyimagenet": "Tiny-ImageNet", "folder": "Folder"}
PAPER_SOURCE = "gmm_readme"  # the GMM paper's own table; the other source in the CSV is SPT/LSA's
REFERENCE_SHAPE = (32, 10)  # the paper counts Params / MACs at 32x32 input, 10 classes
PLOTS = ("accuracy", "paired_difference", "learning_curves", "vs_paper")  # written for every grid
KERNELS_PLOT = "kernels"  # written only when the cells include K variants (gmm-k3, ...)
MASK_FIGURES = "masks"  # plots/masks/<model>-<mask>.png, one per masked model x mask spec
# A K variant's spec (gmmvit.masks.base's grammar); a family listed bare has the recipe's K.
KERNEL_SPEC = re.compile(r"(?P<family>[a-z0-9_]+)-k(?P<kernels>[1-9][0-9]*)")
DEFAULT_KERNELS = 5  # the built-in recipes' mask_kernels, for a record that does not say its own
TABLES = ("table.md", "table_best.md", "table_last.md", "table.csv", "tables.html", "history.csv")
CONFIDENCE = 0.95
# Fields of the flat record that older code did not write: a record lacking any of them has
# incomplete provenance (the table's header says so, and which).
PROVENANCE = ("selection", "selected_epoch", "selected_top1", "val_top1", "val_fraction", "learned",
              "not_learned_reason", "final_train_loss", "chance_top1", "cpu_capability", "host",
              "slurm_job_id", "slurm_node", "granted_cpus", "gpu_ids", "device_slot", "source_hash",
              "dataset_fingerprint", "deterministic", "num_classes", "img_size", "n_train", "n_val",
              "n_test", "numerics", "cpu", "mkl_branch", "weights_sha256")
# The CPU facts of a record (gmmvit.numerics.cpu_facts), flattened to cpu_<fact> columns.
CPU_FACTS = ("vendor", "model_name", "family", "model", "stepping", "flags", "l2_kib", "l3_kib")
VERSIONS = {"torch": "torch", "timm": "timm", "cuda": "CUDA", "cudnn": "cuDNN", "python": "python",
            "gmmvit": "gmmvit", "mkl": "MKL", "onednn": "oneDNN"}
NOT_LEARNED = "✗"
NOT_LEARNED_NOTE = (f"{NOT_LEARNED}: did not learn (train loss stayed at ln C / top-1 near chance); "
                    "not used as a baseline, left out of every mean and difference.")
MACS_NOTE = ("MACs (fvcore): fvcore's count of matrix products, linear and convolution layers, "
             "normalisation and the attention products (q·kᵀ and attention·v, through a registered "
             "handle); element-wise operations and softmax are not counted. MACs (paper conv.): the "
             "paper's module-hook convention (linear, convolution and normalisation layers only, no "
             "attention products).")


# ---------------------------------------------------------------- reading


def find_files(paths: Iterable[str | Path], name: str) -> list[Path]:
    """Files given directly, or found recursively (sorted) under folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob(name))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def _final_train_loss(metrics: Path) -> float | None:
    """An older record's last train loss, from the history.csv beside it (None if not there)."""
    path = Path(metrics).with_name("history.csv")
    if not path.is_file():
        return None
    losses = pd.read_csv(path).get("train_loss", pd.Series(dtype=float)).dropna()
    return float(losses.iloc[-1]) if len(losses) else None


def flat_record(record: dict) -> dict:
    """A metrics.json as one flat row of table.csv: versions as ``<name>_version`` (a null version
    is a fact, "none": a CPU build has no CUDA; a missing one stays unknown), the CPU's facts as
    ``cpu_<fact>``, the kernel environment as one JSON column."""
    row = dict(record)
    row |= {f"{k}_version": "none" if v is None else v for k, v in (row.pop("versions", None) or {}).items()}
    cpu = row.pop("cpu", None) or {}
    row |= {f"cpu_{k}": (" ".join(cpu[k]) if k == "flags" else cpu[k]) for k in CPU_FACTS if k in cpu}
    if isinstance(row.get("kernel_environment"), dict):
        row["kernel_environment"] = json.dumps(row["kernel_environment"], sort_keys=True)
    return row


def load_records(metrics_files: Sequence[Path]) -> pd.DataFrame:
    """One row per cell; versions flattened to ``<name>_version`` columns, the resolved recipe kept
    as a dict. A record written by older code loads too: its missing fields are unknown (NaN), its
    selection is the best test epoch (the only figure it has), and ``missing_fields`` names them."""
    rows = []
    for path in metrics_files:
        record = json.loads(Path(path).read_text())
        versions = record.get("versions") or {}
        missing = [k for k in PROVENANCE if k not in record] + \
            [f"versions.{k}" for k in VERSIONS if k not in versions]
        row = flat_record(record)
        if "selected_top1" not in record:  # older code kept the best test epoch only
            row |= {"selection": "test", "selected_top1": record.get("best_top1"),
                    "selected_epoch": record.get("best_epoch")}
        if "final_train_loss" not in record:
            row["final_train_loss"] = _final_train_loss(Path(path))
        rows.append(row | {"missing_fields": ", ".join(missing), "metrics": str(path)})
    if not rows:
        raise ValueError("no metrics.json records to report")
    cells = pd.DataFrame(rows)
    for column in [*(k for k in PROVENANCE if k != "cpu"), *(f"cpu_{k}" for k in CPU_FACTS),
                   *(f"{k}_version" for k in VERSIONS), "device", "threads", "kernel_environment",
                   "wall_time_s", "train_images_per_s", "best_top1", "best_epoch", "last_top1"]:
        if column not in cells:
            cells[column] = None
    # True / False / None (unknown), never NaN: `learned is False` is what excludes a cell
    cells["learned"] = cells["learned"].map(lambda v: bool(v) if isinstance(v, (bool, np.bool_)) else None) \
        .astype(object)
    duplicated = cells.duplicated(IDENTITY, keep=False)
    if duplicated.any():
        raise ValueError("several records for one cell: " + ", ".join(cells.loc[duplicated, "metrics"]))
    return cells


def load_histories(cells: pd.DataFrame) -> pd.DataFrame:
    """Every cell's history.csv (beside its metrics.json), with the cell's identity columns."""
    frames = []
    for _, cell in cells.iterrows():
        path = Path(cell["metrics"]).with_name("history.csv")
        if path.is_file():
            frames.append(pd.read_csv(path).assign(**{k: cell[k] for k in IDENTITY}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*IDENTITY, "epoch"])


def load_measures(measure_files: Sequence[Path]) -> pd.DataFrame:
    columns = ["model", "mask", "img_size", "num_classes", "params", "mask_params", "macs_all",
               "macs_paper", "depth"]
    rows = [json.loads(Path(p).read_text()) for p in measure_files]
    return pd.DataFrame(rows, columns=columns).drop_duplicates(["model", "mask", "img_size", "num_classes"])


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's figures, long: model, mask, dataset, paper_top1 (plus params_m, macs_m, depth)."""
    if path is None:
        with resources.files("gmmvit").joinpath("reference/paper_table.csv").open() as f:
            table = pd.read_csv(f)
    else:
        table = pd.read_csv(path)
    table = table[table["source"] == PAPER_SOURCE].drop(columns="source")
    datasets = [c for c in table.columns if c not in ("model", "mask", "params_m", "macs_m", "depth")]
    return table.melt(id_vars=["model", "mask", "params_m", "macs_m", "depth"], value_vars=datasets,
                      var_name="dataset", value_name="paper_top1").dropna(subset=["paper_top1"])


# ---------------------------------------------------------------- the tidy table


def _ordered(values: Iterable[str], known: dict[str, str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in known if v in present] + [v for v in present if v not in known]


def _measure_of(cell: pd.Series, measures: pd.DataFrame) -> pd.Series | None:
    """A cell's measure: the one of its model, mask, image size and class count; for an older
    record without the last two, the one with its parameter count (which pins them)."""
    rows = measures[(measures["model"] == cell["model"]) & (measures["mask"] == cell["mask"])]
    if pd.notna(cell["img_size"]) and pd.notna(cell["num_classes"]):
        rows = rows[(rows["img_size"] == cell["img_size"]) & (rows["num_classes"] == cell["num_classes"])]
    else:
        rows = rows[rows["params"] == cell["params"]]
    return rows.sort_values(["img_size", "num_classes"]).iloc[0] if not rows.empty else None


def _learned(cell: pd.Series) -> tuple[bool | None, str | None, str]:
    """(learned, reason, source): the record's own verdict, or for an older record the same rule
    applied to its last train loss (history.csv) and class count; unknown if neither is there.
    The rule is train.did_not_learn's, restated here: importing train would pull in torch and make
    the report depend on a file the workflow does not list as its input."""
    if isinstance(cell["learned"], bool):
        return cell["learned"], cell["not_learned_reason"], "record"
    loss, classes, top1 = cell["final_train_loss"], cell["num_classes"], cell["selected_top1"]
    if pd.isna(loss) or pd.isna(classes) or pd.isna(top1):
        return None, None, "unknown"
    ln_c, chance = math.log(classes), 100.0 / classes
    if loss >= 0.95 * ln_c:  # stayed within 5% of ln C (or above it)
        return False, f"final train loss {loss:.3f} within 5% of ln C = {ln_c:.3f}", "inferred"
    if top1 < 1.5 * chance:
        return False, f"top-1 {top1:.2f} below 1.5x chance ({chance:.2f})", "inferred"
    return True, None, "inferred"


def usable(table: pd.DataFrame) -> pd.Series:
    """Cells that may enter a mean or a difference: all but those known not to have learned."""
    return table["learned"].map(lambda v: v is not False).astype(bool)


def cell_table(cells: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its record, its model's measure, the paper's figure, and for each metric
    the paired difference to the unmasked cell of the same recipe, dataset, model and seed (NaN
    when either of the two did not learn)."""
    table = cells.copy()
    measured = [_measure_of(cell, measures) for _, cell in table.iterrows()]
    for column in ("mask_params", "macs_all", "macs_paper", "depth"):
        table[column] = [m[column] if m is not None else np.nan for m in measured]
    for column in ("img_size", "num_classes"):  # older records: known through their measure
        table[column] = [c if pd.notna(c) else (m[column] if m is not None else np.nan)
                         for c, m in zip(table[column], measured)]
    verdicts = [_learned(cell) for _, cell in table.iterrows()]
    table["learned"] = pd.Series([v[0] for v in verdicts], index=table.index, dtype=object)
    table["not_learned_reason"] = [v[1] for v in verdicts]
    table["learned_from"] = [v[2] for v in verdicts]

    ok = usable(table)
    key = ["recipe", "dataset", "model", "seed"]
    index = pd.MultiIndex.from_frame(table[key])
    for metric in ("selected_top1", "best_top1", "last_top1"):
        values = pd.to_numeric(table[metric], errors="coerce")
        base = values[(table["mask"] == "none") & ok]
        base.index = pd.MultiIndex.from_frame(table.loc[base.index, key])
        paired = values.to_numpy() - base.reindex(index).to_numpy()
        # rounded as the records are (4 decimals), so the CSV shows 1.41, not 1.4099999999999966
        table[f"{metric}_vs_none"] = np.where(ok, paired, np.nan).round(4)
        # per comparison (recipe, dataset, model, mask vs none): what its seeds resolve, what it needs
        comparison = ["recipe", "dataset", "model", "mask"]
        found = {k: seeds_needed(d) for k, d in table.groupby(comparison, sort=False)[f"{metric}_vs_none"]}
        keys = [k if mask != "none" else None for k, mask in
                zip(zip(*(table[c] for c in comparison)), table["mask"])]
        table[f"{metric}_resolvable"] = [round(found[k][0], 4) if k and pd.notna(found[k][0]) else np.nan
                                         for k in keys]
        table[f"{metric}_seeds_needed"] = pd.array([found[k][1] if k else None for k in keys], dtype="Int64")
    paper = reference[["model", "mask", "dataset", "paper_top1"]]
    table = table.merge(paper, on=["model", "mask", "dataset"], how="left")
    paper_none = paper[paper["mask"] == "none"].set_index(["model", "dataset"])["paper_top1"]
    table["paper_vs_none"] = (table["paper_top1"].to_numpy() - paper_none.reindex(
        pd.MultiIndex.from_frame(table[["model", "dataset"]])).to_numpy()).round(4)
    if "recipe_config" in table:  # one JSON string per row, last: tidy, and still the whole recipe
        table["recipe_config"] = table.pop("recipe_config").map(
            lambda r: json.dumps(r, sort_keys=True) if isinstance(r, dict) else r)
    first = IDENTITY + ["selection", "selected_epoch", "selected_top1", "val_top1", "val_fraction",
                        "best_top1", "best_epoch", "last_top1", "epochs", "learned", "not_learned_reason",
                        "learned_from", "selected_top1_vs_none", "best_top1_vs_none", "last_top1_vs_none",
                        "paper_top1", "paper_vs_none", "params", "mask_params", "macs_all", "macs_paper",
                        "depth", "img_size", "num_classes"]
    table = table[[c for c in first if c in table] + [c for c in table if c not in first]]
    rank = {"dataset": list(dict.fromkeys(table["dataset"])),
            "model": _ordered(table["model"], MODEL_NAMES), "mask": _ordered(table["mask"], MASK_NAMES)}
    return table.sort_values(
        IDENTITY, key=lambda col: col.map(rank[col.name].index) if col.name in rank else col
    ).reset_index(drop=True)


# ---------------------------------------------------------------- statistics


def t_interval(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of its two-sided 95% Student-t interval with n-1 degrees of freedom, n) of
    the non-NaN values; the half-width is NaN below two values: one value has no interval."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


MOST_SEEDS = 1000  # beyond this, a difference counts as not resolvable by more seeds


def seeds_needed(values: Iterable[float]) -> tuple[float, int | None, int]:
    """For paired differences: (the smallest difference these n seeds resolve at 95%, i.e. the
    t half-width t_{0.975, n-1} s / sqrt(n); the fewest seeds m >= 2 with t_{0.975, m-1} s / sqrt(m)
    below the observed |mean difference|, assuming the observed paired std s; n). NaN / None below
    two pairs; None when the mean is 0 or more than MOST_SEEDS seeds would be needed."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    n = len(x)
    if n < 2:
        return math.nan, None, n
    s, observed = float(x.std(ddof=1)), abs(float(x.mean()))
    resolvable = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * s / math.sqrt(n)
    if observed == 0:
        return resolvable, None, n
    if s == 0:
        return resolvable, 2, n
    m = np.arange(2, MOST_SEEDS + 1)
    enough = stats.t.ppf(0.5 + CONFIDENCE / 2, m - 1) * s / np.sqrt(m) < observed
    return resolvable, (int(m[enough.argmax()]) if enough.any() else None), n


def summary(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per dataset x model x mask: cells, how many did not learn, mean and std over the rest, and
    the paired difference to the unmasked model (mean, 95% half-width, number of pairs)."""
    ok = usable(table)
    rows = []
    for (dataset, model, mask), group in table.groupby(["dataset", "model", "mask"], sort=False):
        good = pd.to_numeric(group.loc[ok[group.index], metric], errors="coerce").dropna()
        failed = pd.to_numeric(group.loc[~ok[group.index], metric], errors="coerce").dropna()
        diff, half, pairs = t_interval(group[f"{metric}_vs_none"]) if mask != "none" else (math.nan,) * 2 + (0,)
        needed = seeds_needed(group[f"{metric}_vs_none"])[1] if mask != "none" else None
        rows.append({"dataset": dataset, "model": model, "mask": mask, "cells": len(group),
                     "not_learned": int((~ok[group.index]).sum()), "n": len(good),
                     "mean": good.mean() if len(good) else math.nan,
                     "std": good.std() if len(good) > 1 else math.nan,
                     "failed_values": failed.tolist(),
                     "diff": diff, "half_width": half, "pairs": pairs, "seeds_needed": needed})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- markdown


def mask_label(mask: str) -> tuple[str, str]:
    """A mask spec's display name and variant: ("GMM", "") for gmm, ("GMM", " (K=3)") for gmm-k3."""
    family, dash_k, kernels = mask.partition("-k")
    if dash_k and kernels.isdigit() and family in MASK_NAMES:
        return MASK_NAMES[family], f" (K={kernels})"
    return MASK_NAMES.get(mask, mask.upper()), ""


def row_label(model: str, mask: str) -> str:
    """GMM-ViT, or GMM-ViT (K=3) for the spec gmm-k3."""
    name = MODEL_NAMES.get(model, model)
    prefix, variant = mask_label(mask)
    return (f"{prefix}-{name}" if prefix else name) + variant


def _fmt_millions(value: float) -> str:
    return "—" if pd.isna(value) else f"{value / 1e6:.2f}M"


def cell_text(s: pd.Series) -> str:
    """One table cell: see the module docstring for what it claims."""
    if s["n"] == 0:  # nothing learned: show what there is, flagged, and nothing else
        failed = s["failed_values"]
        if s["cells"] == 1:
            return f"{failed[0]:.2f} {NOT_LEARNED}" if failed else NOT_LEARNED
        spread = f" ({min(failed):.2f}–{max(failed):.2f})" if failed else ""
        return f"{NOT_LEARNED} {s['not_learned']} of {s['cells']} seeds{spread}"
    text = f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["n"] > 1 else "")
    counts = f"n={s['n']}" + (f", {NOT_LEARNED} {s['not_learned']} of {s['cells']} seeds"
                              if s["not_learned"] else "")
    text += f" ({counts})"
    if s["mask"] != "none" and s["pairs"] >= 2:
        pairs = f", {s['pairs']} pairs" if s["pairs"] != s["n"] else ""
        text += f" [{s['diff']:+.2f} ± {s['half_width']:.2f}{pairs}]"
    return text


def _markdown(frame: pd.DataFrame) -> str:
    # Written by hand: pandas' to_markdown needs tabulate, not a dependency of the package.
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join(["---"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _shape_measure(measures: pd.DataFrame, model: str, mask: str) -> pd.Series | None:
    """The measure the table's Params/MACs columns show: the paper's 32 px / 10 classes if
    measured, otherwise the smallest shape measured for this model and mask."""
    rows = measures[(measures["model"] == model) & (measures["mask"] == mask)]
    if rows.empty:
        return None
    at_reference = rows[(rows["img_size"] == REFERENCE_SHAPE[0]) & (rows["num_classes"] == REFERENCE_SHAPE[1])]
    return (at_reference if not at_reference.empty else rows.sort_values(["img_size", "num_classes"])) \
        .iloc[0]


def results_frame(table: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame,
                  metric: str, with_paper: bool) -> pd.DataFrame:
    """The paper's layout: rows model x mask, a column per dataset (and the paper's beside it)."""
    stats_ = summary(table, metric).set_index(["dataset", "model", "mask"], drop=False)
    paper = reference.set_index(["dataset", "model", "mask"])
    datasets = list(dict.fromkeys(table["dataset"]))
    models, masks = _ordered(table["model"], MODEL_NAMES), _ordered(table["mask"], MASK_NAMES)
    rows = []
    for model in models:
        for mask in masks:
            if not ((table["model"] == model) & (table["mask"] == mask)).any():
                continue
            row = {"Model": row_label(model, mask)}
            for dataset in datasets:
                column = DATASET_NAMES.get(dataset, dataset)
                key = (dataset, model, mask)
                row[column] = cell_text(stats_.loc[key]) if key in stats_.index else "—"
                if with_paper and dataset in set(reference["dataset"]):
                    # the paper's single published run: its value, no difference claimed from it
                    row[f"{column} (paper)"] = f"{paper.loc[key, 'paper_top1']:.2f}" \
                        if key in paper.index else "—"
            m = _shape_measure(measures, model, mask)
            ref = reference[(reference["model"] == model) & (reference["mask"] == mask)]
            paper_note = (lambda col: f" ({ref[col].iloc[0]:.1f}M)" if with_paper and not ref.empty else "")
            row["Params"] = (_fmt_millions(m["params"]) if m is not None else "—") + paper_note("params_m")
            row["MACs (fvcore)"] = _fmt_millions(m["macs_all"]) if m is not None else "—"
            row["MACs (paper conv.)"] = (_fmt_millions(m["macs_paper"]) if m is not None else "—") \
                + paper_note("macs_m")
            row["Depth"] = str(int(m["depth"])) if m is not None and pd.notna(m["depth"]) else "—"
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- provenance


def _known(values: Iterable) -> list:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _unique(values: Iterable) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(_known(values))) or "unknown"


def _counted(values: pd.Series) -> list[tuple[str, int]]:
    """Known values with their number of cells, in order of appearance."""
    known = pd.Series([str(v) for v in _known(values)], dtype=object)
    return list(known.value_counts(sort=False).items())


def _mixed(values: pd.Series, what: str) -> str | None:
    """A warning when the cells' known values differ: their results are not alike."""
    counted = _counted(values)
    if len(counted) < 2:
        return None
    return (f"⚠ mixed: cells come from {len(counted)} different {what}: "
            + "; ".join(f"{v} ({n} cell{'s' * (n != 1)})" for v, n in counted) + ".")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g}%"


def _selection_kind(selection: str, fraction: float) -> str:
    if selection == "val":
        return (f"epoch selected on a validation split of {_percent(fraction)} of the training set "
                "(best validation top-1)" if pd.notna(fraction)
                else "epoch selected on a validation split (fraction unknown)")
    if pd.isna(fraction):  # an older record: the best test epoch was all it kept
        return "best test epoch, as the paper: optimistic; the record (older code) holds no validation selection"
    return "best test epoch, as the paper: optimistic; the recipe holds out no validation split"


def selection(table: pd.DataFrame) -> tuple[str, str, str]:
    """(title, sentence, short form for plots) of the selection behind ``selected_top1``."""
    kinds = pd.Series([_selection_kind(s, f) for s, f in zip(table["selection"], table["val_fraction"])],
                      index=table.index)
    if kinds.nunique() == 1:
        kind = kinds.iloc[0]
        if table["selection"].iloc[0] == "val":
            title = "Test top-1 (%) at the epoch selected on validation"
            short = f"epoch selected on {_percent(table['val_fraction'].iloc[0])} validation split" \
                if pd.notna(table["val_fraction"].iloc[0]) else "epoch selected on validation"
        else:
            title = "Test top-1 (%) at the best test epoch (no validation split: optimistic)"
            short = "best test epoch (no validation split: optimistic)"
        return title, f"Selection: {kind}; test top-1 at that epoch.", short
    per_dataset = "; ".join(f"{dataset}: {_unique(group)}" for dataset, group in kinds.groupby(table["dataset"],
                                                                                              sort=False))
    return ("Test top-1 (%) at the selected epoch (⚠ mixed selection)",
            f"⚠ mixed selection, the cells' numbers are not alike: {per_dataset}.", "⚠ mixed selection")


def _run_on(cells: pd.DataFrame) -> pd.Series:
    """Per cell: "cpu (AVX512), 1 thread"."""
    def one(cell: pd.Series) -> str:
        device = cell["device"] if pd.notna(cell["device"]) else "device unknown"
        cap = cell["cpu_capability"] if pd.notna(cell["cpu_capability"]) else "CPU capability unknown"
        threads = "threads unknown" if pd.isna(cell["threads"]) else \
            f"{int(cell['threads'])} thread{'s' * (int(cell['threads']) != 1)}"
        return f"{device} ({cap}), {threads}"
    return cells.apply(one, axis=1)


def cpu_labels(cells: pd.DataFrame) -> pd.Series:
    """Per cell: "AMD EPYC-Rome Processor (AuthenticAMD family 23 model 49 stepping 0)", None if
    the record names no CPU model (older code)."""
    def one(cell: pd.Series) -> str | None:
        if pd.isna(cell.get("cpu_model_name")) and pd.isna(cell.get("cpu_vendor")):
            return None
        # a CSV column with a missing value holds its integers as floats
        facts = {k: (None if pd.isna(v) else int(v) if isinstance(v, float) else v)
                 for k in CPU_FACTS if k != "flags" for v in [cell.get(f"cpu_{k}")]}
        return cpu_label(facts)
    return cells.apply(one, axis=1) if len(cells) else pd.Series(dtype=object)


def numerics_line(table: pd.DataFrame) -> str:
    """Which kernels computed the cells, and on which CPU models."""
    counted = _counted(table["numerics"])
    unknown = int(table["numerics"].isna().sum())
    kinds = "; ".join(f"{v} ({_cells(n)})" for v, n in counted) or "unknown"
    line = f"Numerics: {kinds}" + (f"; unknown for {_cells(unknown)} (older records)" if counted and unknown else "")
    if counted and all(v == "portable" for v, _ in counted):
        line += (" (MKL COMPATIBLE, ATen AVX2, oneDNN off, one thread, fused AdamW: the same bits on any "
                 "x86-64 CPU with AVX2; `gmmvit verify` checks it)")
    elif any(v == "native" for v, _ in counted):
        line += " (native: the numbers are tied to the CPU model)"
    models = _counted(cpu_labels(table))
    line += ". CPU models: " + ("; ".join(f"{v} ({_cells(n)})" for v, n in models) if models else
                                "unknown (older records)") + "."
    return line


def run_on_short(table: pd.DataFrame) -> str:
    counted = _counted(_run_on(table))
    return counted[0][0] if len(counted) == 1 else "⚠ mixed: " + "; ".join(v for v, _ in counted)


def warnings(table: pd.DataFrame) -> list[str]:
    """What makes the cells' numbers not comparable or not fully traceable, said first."""
    # A cell's source hash covers the code it runs (its model's and mask family's modules and what
    # they import), so different models and masks differ by design: compare within a model x mask.
    found = [_mixed(group["source_hash"], f"versions of the {model} {mask} code (source hashes)")
             for (model, mask), group in table.groupby(["model", "mask"], sort=False)]
    found += [_mixed(table["device"], "devices"),
             _mixed(table["cpu_capability"], "CPU capabilities"), _mixed(table["threads"], "thread counts")]
    found += [_mixed(table[f"{k}_version"], f"{name} versions") for k, name in VERSIONS.items()]
    found.append(_mixed(table["numerics"], "numerics settings (portable and native kernels give other bits)"))
    # portable cells' bits do not depend on the CPU; native (or unknown) ones' do
    tied = table["numerics"] != "portable"
    found.append(_mixed(cpu_labels(table[tied]), "CPU models under native (or unknown) numerics, whose "
                        "kernels give other bits on each"))
    for dataset, group in table.groupby("dataset", sort=False):
        found.append(_mixed(group["dataset_fingerprint"], f"{dataset} data (dataset fingerprints)"))
    incomplete = table[table["missing_fields"] != ""]
    if len(incomplete):
        missing = list(dict.fromkeys(f for fields in incomplete["missing_fields"] for f in fields.split(", ")))
        found.append(f"⚠ provenance incomplete: {len(incomplete)} of {len(table)} cells come from records "
                      f"written by older code, without {', '.join(missing)}. What they lack is unknown; "
                      "an older record's selected epoch is its best test epoch (optimistic).")
    inferred, unknown = (table["learned_from"] == "inferred").sum(), (table["learned_from"] == "unknown").sum()
    if inferred:
        found.append(f"{inferred} cells' learned/not-learned verdict is inferred from their history.csv "
                     "(last train loss within 5% of ln C, or top-1 below 1.5x chance), not recorded.")
    if unknown:
        found.append(f"⚠ {unknown} cells have no learned/not-learned verdict (no record of it, no train "
                     "loss or class count to infer it from): they are used as if they had learned.")
    return [w for w in found if w]


def _cells(n: int) -> str:
    return f"{n} cell{'s' * (n != 1)}"


def _listed(values: Sequence[str], most: int = 10) -> str:
    return ", ".join(values[:most]) + (f" and {len(values) - most} more" if len(values) > most else "")


def _never_recorded(table: pd.DataFrame, field: str) -> bool:
    """No record has ``field``: they all come from code older than it (unknown, not "none")."""
    return bool(table[field].isna().all() and table["missing_fields"].str.contains(rf"\b{field}\b").all())


def scheduler(table: pd.DataFrame) -> str:
    """What the cells were granted: "SLURM: 12 jobs (ids) on nodes a, b, 2 CPUs granted (12 cells).
    GPUs: CUDA_VISIBLE_DEVICES 0 (6 cells), 1 (6 cells); local device slots 0:0 (3 cells), ..."."""
    jobs = list(dict.fromkeys(map(str, _known(table["slurm_job_id"]))))
    if not jobs:
        slurm = "SLURM: unknown (older records)." if _never_recorded(table, "slurm_job_id") else "SLURM: none."
    else:
        in_slurm = table["slurm_job_id"].notna()
        nodes = list(dict.fromkeys(map(str, _known(table.loc[in_slurm, "slurm_node"]))))
        slurm = (f"SLURM: {len(jobs)} job{'s' * (len(jobs) != 1)} ({_listed(jobs)}) on "
                 + (f"node{'s' * (len(nodes) != 1)} {', '.join(nodes)}" if nodes else "nodes unknown"))
        cpus = _counted(table.loc[in_slurm, "granted_cpus"].map(lambda v: v if pd.isna(v) else int(v)))
        slurm += ("; CPUs granted per job: " + ", ".join(f"{v} ({_cells(n)})" for v, n in cpus)
                  if cpus else "; CPUs granted unknown")
        outside = int((~in_slurm).sum())
        slurm += (f"; {_cells(outside)} outside SLURM." if outside else ".")
    if _never_recorded(table, "gpu_ids") and _never_recorded(table, "device_slot"):
        return slurm + " GPUs: unknown (older records)."
    gpus, slots = _counted(table["gpu_ids"]), _counted(table["device_slot"])
    if not gpus and not slots:
        return slurm + " GPUs: none."
    parts = []
    if gpus:
        parts.append("CUDA_VISIBLE_DEVICES " + ", ".join(f"{v} ({_cells(n)})" for v, n in gpus))
    if slots:
        parts.append("local device slots (device:k) " + ", ".join(f"{v} ({_cells(n)})" for v, n in slots))
    without = int((table["gpu_ids"].isna() & table["device_slot"].isna()).sum())
    return slurm + " GPUs: " + "; ".join(parts) + (f"; {_cells(without)} without" if without else "") + "."


def provenance(table: pd.DataFrame, grid: str | None) -> list[str]:
    """What was run, on what, by what code, on which data, read from the records."""
    lines = [(f"Grid: `{grid}`. " if grid else "")
             + (f"{len(table)} cells: datasets {_unique(table['dataset'])}; models {_unique(table['model'])}; "
                f"masks {_unique(table['mask'])}; seeds {_unique(table['seed'])}.")]
    recipes = pd.DataFrame([json.loads(r) for r in table["recipe_config"]], index=table.index) \
        if "recipe_config" in table and table["recipe_config"].notna().all() else pd.DataFrame()
    recipe_line = f"Recipe: `{_unique(table['recipe'])}`"
    if not recipes.empty:
        common = [k for k in recipes.columns if recipes[k].astype(str).nunique() == 1]
        recipe_line += " resolved to " + ", ".join(f"{k}={recipes[k].iloc[0]}" for k in common)
        varying = [k for k in recipes.columns if k not in common]
        for dataset, group in recipes[varying].groupby(table["dataset"], sort=False) if varying else []:
            recipe_line += f"; for {dataset}: " + ", ".join(f"{k}={_unique(group[k])}" for k in varying)
    lines.append(recipe_line + ".")
    run_on = "; ".join(f"{v} ({n} cell{'s' * (n != 1)})" for v, n in _counted(_run_on(table)))
    lines.append(f"Run on: {run_on}. Hosts: {_unique(table['host'])}. {scheduler(table)}")
    lines.append(numerics_line(table))
    lines.append("Versions: " + "; ".join(f"{name} {_unique(table[f'{k}_version'])}"
                                          for k, name in VERSIONS.items()) + ".")
    fingerprints = "; ".join(f"{d} {_unique(g)}" for d, g in table["dataset_fingerprint"].groupby(
        table["dataset"], sort=False))
    deterministic = _known(table["deterministic"])
    determinism = "unknown" if not deterministic else (
        "yes (all cells)" if all(deterministic) and len(deterministic) == len(table) else
        "no (no cell)" if not any(deterministic) and len(deterministic) == len(table) else
        f"⚠ mixed: {sum(map(bool, deterministic))} of {len(table)} cells")
    pairs, hashes = table.groupby(["model", "mask"]).ngroups, len(set(_known(table["source_hash"])))
    counted = f"{hashes} over {pairs} model x mask pair{'s' * (pairs != 1)}" if hashes else "unknown"
    lines.append(f"Source hashes (of the code each cell runs): {counted}. Dataset fingerprints: {fingerprints}. "
                 f"Deterministic algorithms: {determinism}.")

    def sizes(group: pd.DataFrame) -> str:
        return ", ".join(f"{k} {_unique(int(v) for v in _known(group[k]))}"
                         for k in ("n_train", "n_val", "n_test"))
    lines.append("Data: " + "; ".join(f"{d}: {sizes(g)}" for d, g in table.groupby("dataset", sort=False)) + ".")
    wall = pd.to_numeric(table["wall_time_s"], errors="coerce")
    speed = pd.to_numeric(table["train_images_per_s"], errors="coerce")
    lines.append(f"Training wall time {wall.sum() / 60:.1f} min over all cells"
                 + (f" ({wall.isna().sum()} cells unknown)" if wall.isna().any() else "")
                 + (f", median {speed.median():.0f} training images/s per cell." if speed.notna().any() else "."))
    return lines


def seeds_line(table: pd.DataFrame, metric: str) -> str | None:
    """One line under a table: per paired comparison, the smallest difference its seeds resolve and
    how many seeds would resolve the observed one (None when no comparison has two pairs)."""
    rows = summary(table, metric)
    rows = rows[(rows["mask"] != "none") & (rows["pairs"] >= 2)]
    if rows.empty:
        return None
    several = table["dataset"].nunique() > 1
    parts = []
    for _, r in rows.iterrows():
        resolvable, needed, pairs = seeds_needed(table.loc[(table["dataset"] == r["dataset"]) & (
            table["model"] == r["model"]) & (table["mask"] == r["mask"]), f"{metric}_vs_none"])
        label = row_label(r["model"], r["mask"]) + (f" ({DATASET_NAMES.get(r['dataset'], r['dataset'])})"
                                                     if several else "")
        verdict = ("resolved" if needed is not None and needed <= pairs else
                   f"needs {needed}" if needed is not None else f"needs more than {MOST_SEEDS}"
                   if r["diff"] != 0 else "no difference to resolve")
        parts.append(f"{label} ±{resolvable:.2f}, {verdict}")
    return ("Seeds a difference needs (95% t, from each comparison's observed paired spread): the "
            "smallest difference its seeds resolve, then whether its observed difference is resolved "
            "or how many seeds would resolve it: " + "; ".join(parts) + ".")


def legend(measures: pd.DataFrame, with_paper: bool) -> str:
    at_reference = ((measures["img_size"] == REFERENCE_SHAPE[0])
                    & (measures["num_classes"] == REFERENCE_SHAPE[1])).any()
    return (
        "Cells: with n >= 2 seeds, mean ± std over the seeds that learned (n=...); [+x.xx ± h] is the "
        "difference to the unmasked model of the same family, paired by seed (only seeds present and "
        f"learned in both; \"k pairs\" when fewer than n), with h the half-width of its {CONFIDENCE:.0%} "
        "t-interval (k-1 degrees of freedom). With one seed (n=1), no difference is claimed. "
        "Params and MACs " + ("at 32x32 input, 10 classes (the paper's convention)" if at_reference
                              else "at the smallest measured input size and class count")
        + (", with the paper's figure in parentheses" if with_paper else "") + ". " + MACS_NOTE)


def write_tables(table: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame,
                 out_dir: Path, grid: str | None, histories: pd.DataFrame) -> None:
    title, selected, _ = selection(table)
    warned, described = warnings(table), provenance(table, grid)
    paper_note = (f"(paper) columns: the GMM paper's published best-epoch top-1 ({PAPER_SOURCE} in "
                  "gmmvit/reference/paper_table.csv), one run each: no difference is claimed from them.")
    flagged = bool((~usable(table)).any())

    html_sections: list[str] = []

    def page(heading: str, first: str, frame: pd.DataFrame, with_paper: bool, metric: str,
             note: str = "") -> str:
        has_paper = any(c.endswith("(paper)") for c in frame.columns)
        # the table first, then what it needs to be read: the seeds its differences need, the
        # flags, the legend, the provenance
        seeds = seeds_line(table, metric)
        after = [seeds] * bool(seeds) + warned + [NOT_LEARNED_NOTE] * flagged
        after += [legend(measures, with_paper and has_paper)]
        after += [paper_note] * has_paper + [note] * bool(note) + described
        html_sections.append(_html_section(heading, [first], frame, after))
        return "\n\n".join([f"# {heading}", first, _markdown(frame), *after]) + "\n"

    (out_dir / "table.md").write_text(page(
        title, selected + (" This is the paper's own selection: table_best.md shows it beside the paper's "
                           "figures" if (table["selection"] == "test").all() else " The paper's own "
                           "selection (best test epoch) is in table_best.md, beside the paper's figures")
        + "; the last epoch is in table_last.md.",
        results_frame(table, measures, reference, "selected_top1", with_paper=False), with_paper=False,
        metric="selected_top1"))
    (out_dir / "table_best.md").write_text(page(
        "Test top-1 (%) at the best test epoch (the paper's selection: optimistic)",
        "Selection: best test epoch, as the paper: optimistic (the epoch is chosen on the numbers it "
        "reports); for comparison with the paper's figures. The headline is in table.md ("
        + selected.rstrip(".") + ").",
        results_frame(table, measures, reference, "best_top1", with_paper=True), with_paper=True,
        metric="best_top1"))
    (out_dir / "table_last.md").write_text(page(
        "Test top-1 (%) at the last epoch", "Selection: none, the last epoch.",
        results_frame(table, measures, reference, "last_top1", with_paper=False), with_paper=False,
        metric="last_top1", note="The paper reports the best epoch only, so no paper figures here."))
    table.to_csv(out_dir / "table.csv", index=False)
    # every epoch of every cell, keyed by cell: what `gmmvit verify` compares a re-trained cell with
    histories.to_csv(out_dir / "history.csv", index=False)
    # The same three tables as one HTML page: what `snakemake --report` shows inline (it offers
    # markdown only as a download).
    (out_dir / "tables.html").write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>gmmvit results</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(html_sections) + "\n</body></html>\n")


HTML_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:75em}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}p{line-height:1.4}"
)


def _html_text(text: str) -> str:
    """A markdown paragraph of ours as HTML: escaped, with `code` spans kept."""
    import html
    import re

    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_section(heading: str, prose: Sequence[str], frame: pd.DataFrame, after: Sequence[str]) -> str:
    parts = [f"<h2>{_html_text(heading)}</h2>"]
    parts += [f"<p>{_html_text(p)}</p>" for p in prose if p]
    parts.append(frame.to_html(index=False, border=0, escape=True))
    parts += [f"<p>{_html_text(p)}</p>" for p in after]
    return "<section>\n" + "\n".join(parts) + "\n</section>"


# ---------------------------------------------------------------- plots


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        Model=frame["model"].map(lambda m: MODEL_NAMES.get(m, m)),
        Mask=frame["mask"],
        Dataset=frame["dataset"].map(lambda d: DATASET_NAMES.get(d, d)),
    )


def _placeholder(path: Path, message: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panels(n: int, width: float = 4.2, height: float = 3.6):
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.9), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _title(fig, what: str, table: pd.DataFrame, selection_short: str | None, grid=None) -> None:
    """Title the figure with what it shows, what the cells ran on and the epoch selection."""
    import textwrap

    lines = [what, f"run on: {run_on_short(table)}"
             + (f"; selection: {selection_short}" if selection_short else "")]
    lines = [part for line in lines for part in textwrap.wrap(line, width=int(fig.get_figwidth() * 13))]
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.set_figheight(fig.get_figheight() + 0.2 * len(lines))  # the title's room, not the panels'
    # a seaborn grid keeps room on the right for its legend (private, hence the default)
    left, bottom, right, _ = getattr(grid, "_tight_layout_rect", None) or (0, 0, 1, 1)
    fig.tight_layout(rect=(left, bottom, right, 1 - 0.2 * len(lines) / fig.get_figheight()))


def write_plots(table: pd.DataFrame, histories: pd.DataFrame, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    sns.set_theme(style="whitegrid", context="notebook")
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    _, _, chosen = selection(table)
    ok = usable(table)
    datasets = list(dict.fromkeys(table["dataset"]))
    models, masks = _ordered(table["model"], MODEL_NAMES), _ordered(table["mask"], MASK_NAMES)
    palette = dict(zip(masks, sns.color_palette(n_colors=len(masks))))  # a mask keeps its colour
    failed_marker = dict(marker="x", color="crimson", s=70, linewidths=2, zorder=4)
    width = 0.6 / max(len(masks), 1)

    # accuracy: every seed (dots), mean and sd over the seeds that learned, ✗ for those that did not
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for i, model in enumerate(models):
            for j, mask in enumerate(masks):
                cells = table[(table["dataset"] == dataset) & (table["model"] == model) & (table["mask"] == mask)]
                if cells.empty:
                    continue
                x = i + (j - (len(masks) - 1) / 2) * width
                learned = ok[cells.index]
                good, bad = cells.loc[learned, "selected_top1"], cells.loc[~learned, "selected_top1"]
                ax.scatter([x] * len(good), good, color=palette[mask], s=14, alpha=0.5, zorder=2)
                if len(good):
                    ax.errorbar(x, good.mean(), yerr=good.std() if len(good) > 1 else None, fmt="o",
                                color=palette[mask], markersize=7, capsize=3, zorder=3)
                ax.scatter([x] * len(bad), bad, **failed_marker)
        ax.set_xticks(range(len(models)), [MODEL_NAMES.get(m, m) for m in models])
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(DATASET_NAMES.get(dataset, dataset))
        ax.set_ylabel("test top-1 (%)")
    handles = [Line2D([], [], marker="o", linestyle="none", color=palette[m], label=row_label("", m).strip("-")
                      or "none") for m in masks]
    if (~ok).any():
        handles.append(Line2D([], [], marker="x", linestyle="none", color="crimson", markeredgewidth=2,
                              label=f"{NOT_LEARNED} did not learn"))
    axes[-1].legend(handles=handles, fontsize=8, loc="best")
    _title(fig, "Test top-1 at the selected epoch: dots = seeds, marker = mean ± sd over seeds that learned",
           table, chosen)
    fig.savefig(plots / "accuracy.png", dpi=100)
    plt.close(fig)

    # paired differences: mean and 95% t-interval where there are >= 2 pairs, bare points otherwise
    diffs = summary(table, "selected_top1")
    diffs = diffs[diffs["mask"] != "none"]
    if diffs.empty or table.loc[table["mask"] == "none"].empty:
        _placeholder(plots / "paired_difference.png", "No mask-minus-none difference: the grid needs "
                     "mask 'none' and at least one other mask.")
    else:
        labels = [row_label(mo, ma) for mo in models for ma in masks if ma != "none"]
        fig, axes = _panels(len(datasets), height=max(3.2, 0.5 * len(labels) + 2.0))
        for ax, dataset in zip(axes, datasets):
            for _, s in diffs[diffs["dataset"] == dataset].iterrows():
                y = labels.index(row_label(s["model"], s["mask"]))
                colour = palette[s["mask"]]
                if s["pairs"] >= 2:
                    ax.errorbar(s["diff"], y, xerr=s["half_width"], fmt="o", color=colour, capsize=4)
                    ax.annotate(f"n={s['pairs']}", (s["diff"], y), xytext=(0, 7), textcoords="offset points",
                                ha="center", fontsize=7)
                else:
                    points = table[(table["dataset"] == dataset) & (table["model"] == s["model"])
                                   & (table["mask"] == s["mask"])]["selected_top1_vs_none"].dropna()
                    ax.scatter(points, [y] * len(points), facecolors="none", edgecolors="grey", s=40)
                    if len(points):
                        ax.annotate("n=1: no interval", (points.iloc[0], y), xytext=(0, 7),
                                    textcoords="offset points", ha="center", fontsize=7, color="dimgrey")
                    else:  # baseline missing or did not learn: nothing to compare
                        ax.annotate("no usable pair", (0.5, y), xycoords=("axes fraction", "data"),
                                    ha="center", va="center", fontsize=7, color="dimgrey")
            ax.axvline(0, color="black", linewidth=0.8)
            ax.margins(x=0.2)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_title(DATASET_NAMES.get(dataset, dataset))
            ax.set_xlabel("masked − unmasked (points)")
        _title(fig, f"Paired difference to the unmasked model: mean and {CONFIDENCE:.0%} t-interval; "
               "hollow grey = single pair, no interval", table, chosen)
        fig.savefig(plots / "paired_difference.png", dpi=100)
        plt.close(fig)

    # learning curves: one line per seed (a failed seed stays visible), test solid, validation dashed
    if histories.empty or "test_top1" not in histories:
        _placeholder(plots / "learning_curves.png", "No history.csv beside the records.")
    else:
        splits = {"test_top1": "test", "val_top1": "validation"}
        present = [c for c in splits if c in histories and histories[c].notna().any()]
        curves = _labelled(histories).melt(id_vars=["Dataset", "Model", "Mask", "seed", "epoch"],
                                           value_vars=present, var_name="split", value_name="top1") \
            .dropna(subset=["top1"])
        curves["split"] = curves["split"].map(splits)
        grid = sns.relplot(data=curves, kind="line", x="epoch", y="top1", hue="Mask", hue_order=masks,
                           palette=palette, style="split", style_order=[splits[c] for c in present],
                           units="seed", estimator=None, row="Dataset", col="Model",
                           col_order=[MODEL_NAMES.get(m, m) for m in models], height=2.6, aspect=1.2,
                           facet_kws={"sharey": "row", "margin_titles": True})
        grid.set_axis_labels("epoch", "top-1 (%)").set_titles(row_template="{row_name}",
                                                              col_template="{col_name}")
        _title(grid.figure, "Top-1 per epoch, one line per seed: test (solid)"
               + (", validation (dashed)" if "val_top1" in present else ""), table, None, grid)
        grid.savefig(plots / "learning_curves.png", dpi=100)
        plt.close(grid.figure)

    # ours (best test epoch, as the paper selects) vs the paper: on the diagonal, we reproduce it
    both = table.dropna(subset=["paper_top1"])
    if both.empty:
        _placeholder(plots / "vs_paper.png", "No cell of this grid is in the paper's table "
                     "(it reports CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet).")
    else:
        shown = list(dict.fromkeys(both["dataset"]))
        fig, axes = _panels(len(shown), width=4.0, height=4.0)
        for ax, dataset in zip(axes, shown):
            cells = both[both["dataset"] == dataset]
            for (model, mask), group in cells.groupby(["model", "mask"], sort=False):
                paper, good = group["paper_top1"].iloc[0], group.loc[ok[group.index], "best_top1"]
                bad = group.loc[~ok[group.index], "best_top1"]
                if len(good):
                    ax.errorbar(paper, good.mean(), yerr=good.std() if len(good) > 1 else None, fmt="o",
                                color=palette[mask], capsize=3)
                    ax.annotate(f"{row_label(model, mask)} (n={len(good)})", (paper, good.mean()),
                                xytext=(4, 4), textcoords="offset points", fontsize=7)
                ax.scatter([paper] * len(bad), bad, **failed_marker)
            lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
            hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(DATASET_NAMES.get(dataset, dataset))
            ax.set_xlabel("paper's best-epoch top-1 (%)")
            ax.set_ylabel("ours, best test epoch (%)")
        _title(fig, f"Ours vs the paper, both at the best test epoch; {NOT_LEARNED} (red) = did not learn",
               table, "best test epoch, as the paper")
        fig.savefig(plots / "vs_paper.png", dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------- accuracy against K


def has_kernel_variants(masks: Iterable[str]) -> bool:
    """Whether the mask specs include a K variant (gmm-k3): only then is there a K plot. The
    workflow (rules/common.smk) asks the same of the grid's specs to list kernels.png."""
    return any(KERNEL_SPEC.fullmatch(spec) for spec in masks)


def _recipe_kernels(recipe_config) -> int:
    """The K a bare family spec (gmm) trained with: its resolved recipe's mask_kernels."""
    if isinstance(recipe_config, str):
        recipe_config = json.loads(recipe_config)
    if isinstance(recipe_config, dict) and "mask_kernels" in recipe_config:
        return int(recipe_config["mask_kernels"])
    return DEFAULT_KERNELS


def kernel_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cells of every family the cells list with a K variant, with their ``family`` and K
    (``kernels``): gmm-k3 has K=3; the bare family (gmm) has its recipe's mask_kernels. A family
    without any -k<K> spec among the cells is left out (a single K is no ablation)."""
    families = {m["family"] for spec in table["mask"].unique() if (m := KERNEL_SPEC.fullmatch(spec))}
    rows = []
    for index, cell in table.iterrows():
        if match := KERNEL_SPEC.fullmatch(cell["mask"]):
            rows.append((index, match["family"], int(match["kernels"])))
        elif cell["mask"] in families:
            rows.append((index, cell["mask"], _recipe_kernels(cell.get("recipe_config"))))
    picked = table.loc[[i for i, _, _ in rows]].copy()
    picked["family"] = [f for _, f, _ in rows]
    picked["kernels"] = [k for _, _, k in rows]
    return picked


def kernel_summary(table: pd.DataFrame, metric: str = "selected_top1") -> pd.DataFrame:
    """Per dataset x model x family x K: the mean of ``metric`` over the seeds that learned, the
    half-width of its 95% t-interval (NaN with one seed), n, how many did not learn, and the
    unmasked model's mean beside it (``none_mean``; NaN if the cells have no usable baseline)."""
    cells = kernel_cells(table)
    ok = usable(table)
    columns = ["dataset", "model", "family", "kernels", "mean", "half_width", "n", "not_learned", "none_mean"]
    rows = []
    for (dataset, model, family, kernels), group in cells.groupby(
            ["dataset", "model", "family", "kernels"], sort=False):
        learned = ok[group.index]
        mean, half, n = t_interval(pd.to_numeric(group.loc[learned, metric], errors="coerce"))
        baseline = table[(table["dataset"] == dataset) & (table["model"] == model)
                         & (table["mask"] == "none") & ok]
        rows.append({"dataset": dataset, "model": model, "family": family, "kernels": kernels,
                     "mean": mean, "half_width": half, "n": n, "not_learned": int((~learned).sum()),
                     "none_mean": pd.to_numeric(baseline[metric], errors="coerce").mean()
                     if len(baseline) else math.nan})
    frame = pd.DataFrame(rows, columns=columns)
    models = _ordered(frame["model"], MODEL_NAMES)
    return frame.sort_values(["dataset", "model", "family", "kernels"],
                             key=lambda col: col.map(models.index) if col.name == "model" else col,
                             kind="stable").reset_index(drop=True)


def write_kernels_plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against K: per dataset a panel, per model (colour) and family (marker) the mean
    over seeds with its 95% t-interval; the unmasked model's mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    summary_ = kernel_summary(table)
    _, _, chosen = selection(table)
    datasets = list(dict.fromkeys(summary_["dataset"]))
    models = _ordered(summary_["model"], MODEL_NAMES)
    families = list(dict.fromkeys(summary_["family"]))
    colours = dict(zip(models, sns.color_palette(n_colors=len(models))))
    markers = dict(zip(families, "os^Dv<>"))
    series = [(m, f) for m in models for f in families]
    fig, axes = _panels(len(datasets), width=6.0, height=4.0)
    for ax, dataset in zip(axes, datasets):
        here = summary_[summary_["dataset"] == dataset]
        for i, (model, family) in enumerate(series):
            s = here[(here["model"] == model) & (here["family"] == family)]
            if s.empty:
                continue
            # side by side, so the intervals of two models at one K do not hide each other
            x = s["kernels"] + (i - (len(series) - 1) / 2) * 0.15
            label = f"{MODEL_NAMES.get(model, model)} {mask_label(family)[0]}"
            ax.errorbar(x, s["mean"], yerr=s["half_width"].fillna(0), fmt=f"-{markers[family]}",
                        color=colours[model], capsize=3, label=label)
            for xi, (_, row) in zip(x, s.iterrows()):
                note = f"n={row['n']}" + (f", {NOT_LEARNED}{row['not_learned']}" if row["not_learned"] else "")
                ax.annotate(note, (xi, row["mean"]), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=6, color="dimgrey")
        for model in models:
            baseline = here.loc[here["model"] == model, "none_mean"].dropna()
            if len(baseline):
                ax.axhline(baseline.iloc[0], color=colours[model], linestyle="--", linewidth=1,
                           label=f"{MODEL_NAMES.get(model, model)} unmasked (mean)")
        ks = sorted(here["kernels"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (Gaussians per head)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(DATASET_NAMES.get(dataset, dataset))
        ax.legend(fontsize=7, loc="best")
    _title(fig, f"Test top-1 against K: mean over seeds and {CONFIDENCE:.0%} t-interval (no bar: one "
           "seed); a bare family spec counts at its recipe's mask_kernels", table, chosen)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- what the masks learned
# Each figure is drawn from the mask modules themselves: the cell's model is built as train.py
# built it and the saved parameters are loaded into it by name, so the figure shows what the
# trained model computes, with no formula restated here. This is the one part of the report that
# needs torch and the package's models and masks; it needs no extra workflow input, because a
# change to a model or mask module retrains its cells, and a retrained cell reruns the report.


def rebuild_masks(record: dict, saved: dict) -> list[tuple[str, LocalityMask]]:
    """The masked layers (module name, mask) of the cell ``record`` describes, holding the saved
    parameters ``saved`` (mask_params.pt: "<module name>.<parameter>" -> tensor)."""
    from .masks import LocalityMask, mask_options
    from .models import build_model

    kernels = _recipe_kernels(record.get("recipe_config"))
    model = build_model(record["model"], mask=record["mask"], img_size=int(record["img_size"]),
                        num_classes=int(record["num_classes"]),
                        mask_kwargs=mask_options(record["mask"], default_kernels=kernels))
    masks = [(name, module) for name, module in model.named_modules() if isinstance(module, LocalityMask)]
    expected = {f"{name}.{p}": tuple(value.shape) for name, module in masks
                for p, value in module.named_parameters()}
    misfit = sorted(k for k in set(expected) & set(saved) if tuple(saved[k].shape) != expected[k])
    if set(saved) != set(expected) or misfit:
        raise ValueError(
            f"mask_params.pt does not fit {record['model']} with mask {record['mask']}: missing "
            f"{sorted(set(expected) - set(saved))[:4]}, unexpected {sorted(set(saved) - set(expected))[:4]}, "
            "other shapes: " + (", ".join(f"{k} {tuple(saved[k].shape)} != {expected[k]}" for k in misfit[:2])
                                or "none"))
    model.load_state_dict(saved, strict=False)  # strict=False: everything but the masks is not saved
    return masks


def mask_values(mask) -> np.ndarray:
    """The layer's mask as its module computes it, float64, (heads or 1, N, N), or (heads, 1, 1)
    for a per-head factor that does not depend on the token pair (a temperature)."""
    import torch

    with torch.no_grad():
        return mask().double().cpu().numpy()


def is_per_head_constant(values: np.ndarray) -> bool:
    return values.shape[-2:] == (1, 1)


def mask_by_distance(mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distances, mean, low, high): the layer's mask over its patch-token pairs grouped by their
    Euclidean distance in patches. ``distances`` are those that occur on the layer's grid,
    ascending; ``mean``, ``low`` and ``high`` are (heads or 1, distances): the mean, min and max of
    the mask over the pairs at that distance. For a mask of the distance alone (GMM, ALiBi) the
    three are equal; ELM's learned matrix and RMT's Manhattan decay spread around the mean."""
    from .masks import grid_offsets

    values = mask_values(mask)
    n = mask.num_tokens
    values = np.broadcast_to(values, (values.shape[0], n, n))
    dy, dx = (o.numpy() for o in grid_offsets(mask.grid))
    d2 = dy**2 + dx**2  # integers: pairs at one distance group exactly
    levels = np.unique(d2)
    groups = [values[:, d2 == level] for level in levels]
    return (np.sqrt(levels.astype(float)), np.stack([g.mean(1) for g in groups], 1),
            np.stack([g.min(1) for g in groups], 1), np.stack([g.max(1) for g in groups], 1))


def mask_around_centre(mask) -> np.ndarray:
    """(heads or 1, grid, grid): the mask of the centre patch's query over every key patch."""
    values = mask_values(mask)
    grid, n = mask.grid, mask.num_tokens
    values = np.broadcast_to(values, (values.shape[0], n, n))
    centre = (grid // 2) * grid + grid // 2
    return values[:, centre, :].reshape(-1, grid, grid)


def _short_layer(name: str) -> str:
    """blocks.3.attn.mask -> blocks.3; layers.2.blocks.1.attn.mask -> layers.2.blocks.1."""
    return re.sub(r"\.attn\.mask$|\.mask$", "", name)


def _value_meaning(mask) -> str:
    return "factor on the scaled logits" if mask.combine == "mul" else "bias added to the logits"


def write_mask_figure(metrics: Path, path: Path) -> None:
    """One figure of what a cell's masks learned, from the mask_params.pt beside its record:
    per masked layer the mask against patch distance, one line per head (a band: its min-max
    over the pairs at that distance), or for a per-head temperature a bar per head; and a heat
    map of the mask around the centre patch for the first and last masked layer, per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    record = json.loads(Path(metrics).read_text())
    params = Path(metrics).with_name("mask_params.pt")
    what = f"{row_label(record['model'], record['mask'])}, {record['dataset']}, seed {record['seed']}"
    if not params.is_file():
        _placeholder(path, f"{what}: no mask_params.pt beside {metrics} (written by older code?)")
        return
    masks = rebuild_masks(record, torch.load(params, map_location="cpu", weights_only=True))
    constant = is_per_head_constant(mask_values(masks[0][1]))
    cols = min(6, len(masks))
    rows = math.ceil(len(masks) / cols)
    shown = [] if constant else list(dict.fromkeys([0, len(masks) - 1]))  # first and last layer
    heat_cols = 12
    heat_rows = [math.ceil(mask_around_centre(masks[i][1]).shape[0] / heat_cols) for i in shown]
    top_height, heat_height = 2.3 * rows, [1.35 * r + 0.5 for r in heat_rows]
    fig = plt.figure(figsize=(max(2.9 * cols, 1.3 * heat_cols), top_height + sum(heat_height) + 1.2),
                     layout="constrained")  # lays out the subfigures' titles, labels and colour bars
    parts = fig.subfigures(1 + len(shown), 1, height_ratios=[top_height, *heat_height], squeeze=False)[:, 0]

    axes = parts[0].subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(masks):]:
        ax.set_visible(False)
    for ax, (name, mask) in zip(axes, masks):
        title = f"{_short_layer(name)} ({mask.grid}x{mask.grid}, {mask.num_heads} heads)"
        if constant:
            factors = mask_values(mask).reshape(-1)
            ax.bar(np.arange(1, len(factors) + 1), factors, color="tab:blue")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel("head", fontsize=7)
            ax.set_ylabel("τ_h / s", fontsize=7)
            ax.tick_params(labelsize=7)
            blocked = mask.blocked() is not None
            ax.set_title(title + ("\nown-token logit blocked" if blocked else ""), fontsize=7)
            continue
        distances, mean, low, high = mask_by_distance(mask)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(mean)))
        for head, colour in enumerate(colours):
            ax.plot(distances, mean[head], color=colour, linewidth=1.2)
            if np.any(high[head] > low[head]):
                ax.fill_between(distances, low[head], high[head], color=colour, alpha=0.15, linewidth=0)
        ax.set_title(title + (", shared by heads" if len(mean) < mask.num_heads else ""), fontsize=7)
        ax.set_xlabel("patch distance", fontsize=7)
        ax.set_ylabel(_value_meaning(mask), fontsize=7)
        ax.tick_params(labelsize=7)

    for part, index in zip(parts[1:], shown):
        name, mask = masks[index]
        maps = mask_around_centre(mask)
        heads = len(maps)
        grid_axes = part.subplots(math.ceil(heads / heat_cols), min(heads, heat_cols), squeeze=False).flatten()
        low, high = maps.min(), maps.max()
        for ax in grid_axes[heads:]:
            ax.set_visible(False)
        for head, ax in enumerate(grid_axes[:heads]):
            image = ax.imshow(maps[head], cmap="viridis", vmin=low, vmax=high)
            ax.plot(mask.grid // 2, mask.grid // 2, marker="+", color="red", markersize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("shared by heads" if heads < mask.num_heads else f"head {head + 1}", fontsize=7)
        part.colorbar(image, ax=list(grid_axes[:heads]), shrink=0.8)
        part.suptitle(f"{'first' if index == 0 else 'last'} masked layer, {_short_layer(name)}: the "
                      f"mask of the centre patch (+) over the {mask.grid}x{mask.grid} patches "
                      f"({_value_meaning(mask)})", fontsize=9)

    learned = "" if record.get("learned", True) else f"; {NOT_LEARNED} this cell did not learn"
    if constant:
        how = ("a per-head temperature τ_h relative to the layer's logit scale s, per layer "
               "(1 = the unmasked attention); it does not depend on the patch pair, so no heat map")
    else:
        how = ("top: the mask against patch distance, per layer, one line per head (dark: head 1, "
               "light: the last; band: min-max over the pairs at that distance); below: around the "
               "centre patch")
    import textwrap

    lines = textwrap.wrap(f"What the mask learned: {what} (recipe {record['recipe']}){learned}. {how}",
                          width=int(fig.get_figwidth() * 14))
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def mask_figure_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cell each mask figure shows: per model x masked spec, the first of its cells in the
    table's order (its first dataset, lowest seed: seed 0 of a grid that has it)."""
    masked = table[table["mask"] != "none"]
    return masked.drop_duplicates(["model", "mask"], keep="first")


def write_mask_figures(table: pd.DataFrame, plots_dir: Path) -> list[Path]:
    folder = plots_dir / MASK_FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for _, cell in mask_figure_cells(table).iterrows():
        path = folder / f"{cell['model']}-{cell['mask']}.png"
        write_mask_figure(Path(cell["metrics"]), path)
        written.append(path)
    return written



# ---------------------------------------------------------------- entry point


def report(runs: Sequence[str | Path], out_dir: str | Path, measures: Sequence[str | Path] = (),
           reference: str | Path | None = None, grid: str | None = None) -> pd.DataFrame:
    """Write the tables and plots for the cells under ``runs``; return the tidy cell table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = load_records(find_files(runs, "metrics.json"))
    measured = load_measures(find_files(measures, "*.json"))
    ref = load_reference(reference)
    table = cell_table(cells, measured, ref)
    histories = load_histories(cells)
    write_tables(table, measured, ref, out, grid, histories)
    write_plots(table, histories, out)
    if has_kernel_variants(table["mask"]):
        write_kernels_plot(table, out / "plots" / f"{KERNELS_PLOT}.png")
    write_mask_figures(table, out / "plots")
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmvit report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a cell's metrics.json, or a folder searched for them (e.g. results/runs)")
    parser.add_argument("--out-dir", required=True, help=f"where {', '.join(TABLES)} and plots/ go")
    parser.add_argument("--measures", nargs="*", default=[], metavar="PATH",
                        help="measure JSON files of `gmmvit measure`, or folders of them")
    parser.add_argument("--reference", help="the paper's table (default: gmmvit/reference/paper_table.csv)")
    parser.add_argument("--grid", help="the grid's name, for the tables' header")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``gmmvit report`` (argv without the subcommand); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # the CLI may pass its REMAINDER with the separator
        args = args[1:]
    ns = build_parser().parse_args(args)
    table = report(ns.runs, ns.out_dir, ns.measures, ns.reference, ns.grid)
    plots = [*PLOTS, KERNELS_PLOT] if has_kernel_variants(table["mask"]) else PLOTS
    figures = len(mask_figure_cells(table))
    print(f"{len(table)} cells -> {Path(ns.out_dir) / TABLES[0]}, {', '.join(TABLES[1:])}, "
          f"plots/{{{','.join(plots)}}}.png, {figures} mask figures in plots/{MASK_FIGURES}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
