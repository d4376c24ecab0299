"""What the report reads: the cells' records (metrics.json and the history.csv beside each), the
measure JSONs and the paper's table, each loaded into a frame, or refused in one line naming the file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .files import ReportError, os_error

IDENTITY = ["recipe", "dataset", "model", "mask", "seed"]
PAPER_SOURCE = "gmm_readme"  # the GMM paper's own table; the other source in the CSV is SPT/LSA's
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
OWN_TABLE = "give --reference the paper's table (gmmvit/reference/paper_table.csv), or leave it out"
RETRAIN = ("retrain its cell (remove the cell's folder and run snakemake again), or leave it out of "
           "the report's inputs")


def find_files(paths: Iterable[str | Path], name: str, option: str = "RUN") -> list[Path]:
    """Files given directly, or found recursively (sorted) under folders; ``option`` names the
    argument they came from, for the error a missing one raises."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob(name))
        elif path.is_file():
            found.append(path)
        else:
            raise ReportError(f"{option} {path}: no such file or folder; give the folder the cells were "
                              "trained into (e.g. results/runs) or their metrics.json files"
                              if option == "RUN" else f"{option} {path}: no such file or folder")
    return found


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; a file that is not one is refused, naming it, with ``fix``."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg}: line {err.lineno} column {err.colno}); "
                          f"{fix}") from err
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not a text file ({err.reason}); {fix}") from err
    except OSError as err:
        raise os_error(err, "read", path) from err
    if not isinstance(value, dict):
        raise ReportError(f"{path}: a JSON {type(value).__name__}, not an object; {fix}")
    return value


def read_csv(path: Path | str, fix: str) -> pd.DataFrame:
    """A CSV file; one that pandas cannot read is refused, naming it, with ``fix``."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not a readable CSV file ({str(err).strip() or 'empty'}); {fix}") from err
    except OSError as err:
        raise os_error(err, "read", path) from err


def _final_train_loss(metrics: Path) -> float | None:
    """An older record's last train loss, from the history.csv beside it (None if not there)."""
    path = Path(metrics).with_name("history.csv")
    if not path.is_file():
        return None
    losses = read_csv(path, RETRAIN).get("train_loss", pd.Series(dtype=float)).dropna()
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
        record = read_json(path, RETRAIN)
        if absent := [k for k in IDENTITY if k not in record]:
            raise ReportError(f"{path}: not a cell's record (no {', '.join(absent)}); {RETRAIN}")
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
        raise ReportError("no metrics.json records to report: train the cells first (snakemake), or "
                          "give the folder that holds them (e.g. results/runs)")
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
        raise ReportError("several records for one cell: " + ", ".join(cells.loc[duplicated, "metrics"])
                          + ". Report each cell once: remove the extra records, or leave their folders "
                          "out of RUN")
    return cells


def load_histories(cells: pd.DataFrame) -> pd.DataFrame:
    """Every cell's history.csv (beside its metrics.json), with the cell's identity columns."""
    frames = []
    for _, cell in cells.iterrows():
        path = Path(cell["metrics"]).with_name("history.csv")
        if path.is_file():
            frames.append(read_csv(path, RETRAIN).assign(**{k: cell[k] for k in IDENTITY}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*IDENTITY, "epoch"])


def load_measures(measure_files: Sequence[Path]) -> pd.DataFrame:
    columns = ["model", "mask", "img_size", "num_classes", "params", "mask_params", "macs_all",
               "macs_paper", "depth"]
    fix = "measure it again (`gmmvit measure --out`; snakemake does when the file is removed)"
    rows = [read_json(Path(p), fix) for p in measure_files]
    return pd.DataFrame(rows, columns=columns).drop_duplicates(["model", "mask", "img_size", "num_classes"])


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's figures, long: model, mask, dataset, paper_top1 (plus params_m, macs_m, depth)."""
    if path is None:
        with resources.files("gmmvit").joinpath("reference/paper_table.csv").open() as f:
            table = pd.read_csv(f)
    elif not Path(path).is_file():
        raise ReportError(f"--reference {path}: no such file; {OWN_TABLE}")
    else:
        table = read_csv(path, OWN_TABLE)
    ids = ["model", "mask", "params_m", "macs_m", "depth"]
    if absent := [c for c in ["source", *ids] if c not in table]:
        raise ReportError(f"--reference {path}: no {', '.join(absent)} column; {OWN_TABLE}")
    table = table[table["source"] == PAPER_SOURCE].drop(columns="source")
    datasets = [c for c in table.columns if c not in ids]
    return table.melt(id_vars=ids, value_vars=datasets,
                      var_name="dataset", value_name="paper_top1").dropna(subset=["paper_top1"])
