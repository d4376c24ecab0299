"""Cells -> results tables and plots.

Reads only the cells' records (metrics.json, and the history.csv beside each) and the measure JSONs
of ``gmmvit measure``; every number in a table or plot is a function of those. Writes:

  table.md        the headline: test top-1 at the SELECTED epoch (``selected_top1``: best validation
                  top-1 on a split held out from the training set, or, when the recipe holds out
                  none, the best test epoch, as the paper does: optimistic); its heading says which
  table_best.md   the best test epoch (the paper's figure), beside the paper's published numbers
  table_last.md   the last epoch
  table.csv       tidy: one row per cell, every field of its record, its measure, the paper's figure
  plots/          accuracy.png, paired_difference.png, learning_curves.png, vs_paper.png

What a cell of the markdown tables claims, and no more:

- n >= 2 seeds: mean ± std over the seeds that learned (n=...). The difference to the unmasked model
  of the same family is paired by seed (only seeds present, and learned, in both) and shown as
  [mean difference ± half-width of its 95% t-interval, n-1 degrees of freedom].
- one seed: the value and "(n=1)"; no difference is claimed.
- a cell whose record says it did not learn (``learned: false``: train loss stayed at ln C or top-1
  near chance) is flagged ✗, left out of every mean, and no difference is computed for or against it.

Every table opens with the provenance a reviewer needs (selection, device and CPU capability, hosts,
SLURM jobs, library versions, source hashes, dataset fingerprints, determinism, split sizes, wall
time), and says prominently when cells differ in any of them ("⚠ mixed") or come from records
written before these fields existed ("⚠ provenance incomplete": such a record's selected epoch is
its best test epoch).

``gmmvit report RUN... --out-dir DIR [--measures PATH...] [--reference CSV] [--grid NAME]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

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
PLOTS = ("accuracy", "paired_difference", "learning_curves", "vs_paper")
TABLES = ("table.md", "table_best.md", "table_last.md", "table.csv", "tables.html")
CONFIDENCE = 0.95
# Fields of the flat record that older code did not write: a record lacking any of them has
# incomplete provenance (the table's header says so, and which).
PROVENANCE = ("selection", "selected_epoch", "selected_top1", "val_top1", "val_fraction", "learned",
              "not_learned_reason", "final_train_loss", "chance_top1", "cpu_capability", "host",
              "slurm_job_id", "source_hash", "dataset_fingerprint", "deterministic", "num_classes",
              "img_size", "n_train", "n_val", "n_test")
VERSIONS = {"torch": "torch", "timm": "timm", "cuda": "CUDA", "cudnn": "cuDNN", "python": "python",
            "gmmvit": "gmmvit"}
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


def load_records(metrics_files: Sequence[Path]) -> pd.DataFrame:
    """One row per cell; versions flattened to ``<name>_version`` columns, the resolved recipe kept
    as a dict. A record written by older code loads too: its missing fields are unknown (NaN), its
    selection is the best test epoch (the only figure it has), and ``missing_fields`` names them."""
    rows = []
    for path in metrics_files:
        record = json.loads(Path(path).read_text())
        versions = record.pop("versions", {}) or {}
        missing = [k for k in PROVENANCE if k not in record] + \
            [f"versions.{k}" for k in VERSIONS if k not in versions]
        # a null version is a fact (a CPU build has no CUDA), a missing one is unknown
        row = record | {f"{k}_version": "none" if v is None else v for k, v in versions.items()}
        if "selected_top1" not in record:  # older code kept the best test epoch only
            row |= {"selection": "test", "selected_top1": record.get("best_top1"),
                    "selected_epoch": record.get("best_epoch")}
        if "final_train_loss" not in record:
            row["final_train_loss"] = _final_train_loss(Path(path))
        rows.append(row | {"missing_fields": ", ".join(missing), "metrics": str(path)})
    if not rows:
        raise ValueError("no metrics.json records to report")
    cells = pd.DataFrame(rows)
    for column in [*PROVENANCE, *(f"{k}_version" for k in VERSIONS), "device", "threads",
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


def summary(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per dataset x model x mask: cells, how many did not learn, mean and std over the rest, and
    the paired difference to the unmasked model (mean, 95% half-width, number of pairs)."""
    ok = usable(table)
    rows = []
    for (dataset, model, mask), group in table.groupby(["dataset", "model", "mask"], sort=False):
        good = pd.to_numeric(group.loc[ok[group.index], metric], errors="coerce").dropna()
        failed = pd.to_numeric(group.loc[~ok[group.index], metric], errors="coerce").dropna()
        diff, half, pairs = t_interval(group[f"{metric}_vs_none"]) if mask != "none" else (math.nan,) * 2 + (0,)
        rows.append({"dataset": dataset, "model": model, "mask": mask, "cells": len(group),
                     "not_learned": int((~ok[group.index]).sum()), "n": len(good),
                     "mean": good.mean() if len(good) else math.nan,
                     "std": good.std() if len(good) > 1 else math.nan,
                     "failed_values": failed.tolist(),
                     "diff": diff, "half_width": half, "pairs": pairs})
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


def run_on_short(table: pd.DataFrame) -> str:
    counted = _counted(_run_on(table))
    return counted[0][0] if len(counted) == 1 else "⚠ mixed: " + "; ".join(v for v, _ in counted)


def warnings(table: pd.DataFrame) -> list[str]:
    """What makes the cells' numbers not comparable or not fully traceable, said first."""
    found = [_mixed(table["source_hash"], "source hashes"), _mixed(table["device"], "devices"),
             _mixed(table["cpu_capability"], "CPU capabilities"), _mixed(table["threads"], "thread counts")]
    found += [_mixed(table[f"{k}_version"], f"{name} versions") for k, name in VERSIONS.items()]
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
    slurm = _known(table["slurm_job_id"])
    jobs = list(dict.fromkeys(map(str, slurm)))
    slurm_text = "none" if not jobs else ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
    if table["slurm_job_id"].isna().all() and (table["missing_fields"].str.contains("slurm_job_id")).all():
        slurm_text = "unknown"
    lines.append(f"Run on: {run_on}. Hosts: {_unique(table['host'])}. SLURM jobs: {slurm_text}.")
    lines.append("Versions: " + "; ".join(f"{name} {_unique(table[f'{k}_version'])}"
                                          for k, name in VERSIONS.items()) + ".")
    fingerprints = "; ".join(f"{d} {_unique(g)}" for d, g in table["dataset_fingerprint"].groupby(
        table["dataset"], sort=False))
    deterministic = _known(table["deterministic"])
    determinism = "unknown" if not deterministic else (
        "yes (all cells)" if all(deterministic) and len(deterministic) == len(table) else
        "no (no cell)" if not any(deterministic) and len(deterministic) == len(table) else
        f"⚠ mixed: {sum(map(bool, deterministic))} of {len(table)} cells")
    lines.append(f"Source hash: {_unique(table['source_hash'])}. Dataset fingerprints: {fingerprints}. "
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
                 out_dir: Path, grid: str | None) -> None:
    title, selected, _ = selection(table)
    head = warnings(table) + provenance(table, grid)
    paper_note = (f"(paper) columns: the GMM paper's published best-epoch top-1 ({PAPER_SOURCE} in "
                  "gmmvit/reference/paper_table.csv), one run each: no difference is claimed from them.")
    flagged = bool((~usable(table)).any())

    html_sections: list[str] = []

    def page(heading: str, first: str, frame: pd.DataFrame, with_paper: bool, note: str = "") -> str:
        has_paper = any(c.endswith("(paper)") for c in frame.columns)
        prose = [first, *head, legend(measures, with_paper and has_paper)]
        prose += [paper_note] * has_paper + [note] * bool(note)
        after = [NOT_LEARNED_NOTE] * flagged
        html_sections.append(_html_section(heading, prose, frame, after))
        return "\n\n".join([f"# {heading}", *prose, _markdown(frame), *after]) + "\n"

    (out_dir / "table.md").write_text(page(
        title, selected + (" This is the paper's own selection: table_best.md shows it beside the paper's "
                           "figures" if (table["selection"] == "test").all() else " The paper's own "
                           "selection (best test epoch) is in table_best.md, beside the paper's figures")
        + "; the last epoch is in table_last.md.",
        results_frame(table, measures, reference, "selected_top1", with_paper=False), with_paper=False))
    (out_dir / "table_best.md").write_text(page(
        "Test top-1 (%) at the best test epoch (the paper's selection: optimistic)",
        "Selection: best test epoch, as the paper: optimistic (the epoch is chosen on the numbers it "
        "reports); for comparison with the paper's figures. The headline is in table.md ("
        + selected.rstrip(".") + ").",
        results_frame(table, measures, reference, "best_top1", with_paper=True), with_paper=True))
    (out_dir / "table_last.md").write_text(page(
        "Test top-1 (%) at the last epoch", "Selection: none, the last epoch.",
        results_frame(table, measures, reference, "last_top1", with_paper=False), with_paper=False,
        note="The paper reports the best epoch only, so no paper figures here."))
    table.to_csv(out_dir / "table.csv", index=False)
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
    write_tables(table, measured, ref, out, grid)
    write_plots(table, load_histories(cells), out)
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
    print(f"{len(table)} cells -> {Path(ns.out_dir) / TABLES[0]}, {', '.join(TABLES[1:])}, "
          f"plots/{{{','.join(PLOTS)}}}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
