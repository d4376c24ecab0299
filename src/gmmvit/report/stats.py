"""The statistics behind every claim: which cells learned, differences paired by seed, t-intervals,
the seeds a difference needs, and accuracy against K; plain numbers, no formatting."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from .names import MASK_NAMES, MODEL_NAMES, ordered
from .records import IDENTITY

CONFIDENCE = 0.95
MOST_SEEDS = 1000  # beyond this, a difference counts as not resolvable by more seeds

# A K variant's spec (gmmvit.masks.base's grammar); a family listed bare has the recipe's K.
KERNEL_SPEC = re.compile(r"(?P<family>[a-z0-9_]+)-k(?P<kernels>[1-9][0-9]*)")
DEFAULT_KERNELS = 5  # the built-in recipes' mask_kernels, for a record that does not say its own


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
            "model": ordered(table["model"], MODEL_NAMES), "mask": ordered(table["mask"], MASK_NAMES)}
    return table.sort_values(
        IDENTITY, key=lambda col: col.map(rank[col.name].index) if col.name in rank else col
    ).reset_index(drop=True)


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


def has_kernel_variants(masks: Iterable[str]) -> bool:
    """Whether the mask specs include a K variant (gmm-k3): only then is there a K plot. The
    workflow (rules/common.smk) asks the same of the grid's specs to list kernels.png."""
    return any(KERNEL_SPEC.fullmatch(spec) for spec in masks)


def recipe_kernels(recipe_config) -> int:
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
            rows.append((index, cell["mask"], recipe_kernels(cell.get("recipe_config"))))
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
    models = ordered(frame["model"], MODEL_NAMES)
    return frame.sort_values(["dataset", "model", "family", "kernels"],
                             key=lambda col: col.map(models.index) if col.name == "model" else col,
                             kind="stable").reset_index(drop=True)
