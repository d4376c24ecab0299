"""The provenance summary: what was run, on what, by what code, on which data, read from the
records, and the warnings when the cells are not alike (mixed sources, machines, numerics)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

import pandas as pd

from ..numerics import cpu_label  # torch-free: the tables still need no torch
from .records import CPU_FACTS, VERSIONS


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
    minutes = wall / 60
    per_model = "; ".join(f"{model} {group.median():.0f}" for model, group in speed.groupby(table["model"], sort=False)
                          if group.notna().any())
    # what a user needs to plan a run (README scales these to other machines)
    lines.append(f"Training wall time {minutes.sum():.1f} min over all cells"
                 + (f" ({wall.isna().sum()} cells unknown)" if wall.isna().any() else "")
                 + (f"; per cell {minutes.median():.1f} min median ({minutes.min():.1f}-{minutes.max():.1f})"
                    if minutes.notna().any() else "")
                 + (f"; training images/s per cell, median by model: {per_model}." if per_model else "."))
    return lines
