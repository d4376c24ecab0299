"""The report (gmmvit.report) on records written by hand: the tables' rows, columns and numbers come
from the cells, and every number they print is one the records support (known answers, computed here
by hand). A failed report is one line, and leaves the last report's files as they were."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmmvit import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (model, mask) -> params at 32 px / 10 classes
PARAMS = {("vit", "none"): 2_692_042, ("vit", "gmm"): 2_693_122,
          ("swin", "none"): 7_073_188, ("swin", "gmm"): 7_074_088}
T_975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), as a table prints it: 4.303


def top1(dataset: str, model: str, mask: str, seed: int) -> tuple[float, float, float]:
    """Distinct, easily recomputed numbers per cell: (selected, best, last)."""
    best = {"cifar10": 90.0, "digits": 80.0}[dataset] + {"vit": 1.0, "swin": 2.0}[model] \
        + (0.0 if mask == "none" else 0.5) + 0.25 * seed
    return best - 0.75, best, best - 1.5


def write_cell(runs: Path, dataset: str, model: str, mask: str, seed: int, recipe: str = "demo",
               legacy: bool = False, **fields) -> Path:
    """A cell's metrics.json and history.csv; ``legacy``: the record older code wrote (no selection,
    no learned verdict, no provenance); ``fields`` override the record's keys."""
    selected, best, last = top1(dataset, model, mask, seed)
    selected, best, last = (fields.pop(k, v) for k, v in
                            (("selected_top1", selected), ("best_top1", best), ("last_top1", last)))
    out = runs / recipe / dataset / f"{model}-{mask}" / f"seed{seed}"
    out.mkdir(parents=True)
    history = {"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2], "test_loss": [1.9, 1.4, 1.3],
               "test_top1": [best - 10, best, last], "lr": [1e-3, 5e-4, 1e-6],
               "images_per_s": [100.0, 101.0, 99.0]}
    if not legacy:
        history |= {"val_loss": [1.8, 1.5, 1.4], "val_top1": [70.0, 75.0, 74.0]}
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    record = {
        "dataset": dataset, "model": model, "mask": mask, "seed": seed, "recipe": recipe,
        "best_top1": best, "best_epoch": 2, "last_top1": last, "last_test_loss": 1.3, "epochs": 3,
        "params": PARAMS.get((model, mask), 2_700_000), "wall_time_s": 60.0, "train_images_per_s": 100.0,
        "device": "cpu", "threads": 2,
        "versions": {"torch": "2.14.1", "timm": "1.0.31", "gmmvit": "0.1.0", "python": "3.11.2"},
        "recipe_config": {"epochs": 3, "lr": 0.001, "limit_train": 0 if dataset == "cifar10" else 64},
    }
    if not legacy:
        record |= {
            "selection": "val", "selected_epoch": 2, "selected_top1": selected, "val_top1": 75.0,
            "val_fraction": 0.1, "final_train_loss": 1.2, "chance_top1": 10.0, "learned": True,
            "not_learned_reason": None, "cpu_capability": "AVX512", "host": "node1", "slurm_job_id": None,
            "slurm_node": None, "granted_cpus": None, "gpu_ids": None, "device_slot": None,
            "num_classes": 10, "img_size": 32, "n_train": 1132, "n_val": 125, "n_test": 540,
            "dataset_fingerprint": f"fp-{dataset}", "source_hash": "abc123", "deterministic": True,
            "numerics": "portable", "mkl_branch": "COMPATIBLE", "weights_sha256": f"{seed:064d}",
            "cpu": {"vendor": "AuthenticAMD", "model_name": "AMD EPYC 7B13", "family": 25, "model": 1,
                    "stepping": 1, "flags": ["avx2", "avx512f"], "l2_kib": 512, "l3_kib": 32768},
            "kernel_environment": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"},
        }
        record["versions"] |= {"cuda": None, "cudnn": None, "mkl": "2024.2", "onednn": "3.12.0"}
    record |= fields
    (out / "metrics.json").write_text(json.dumps(record))
    return out / "metrics.json"


def write_measure(folder: Path, model: str, mask: str, img_size: int = 32, num_classes: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "mask": mask, "img_size": img_size, "num_classes": num_classes,
              "params": PARAMS[(model, mask)], "mask_params": 1080 if mask == "gmm" else 0,
              "macs_all": 200_000_000 + PARAMS[(model, mask)], "macs_paper": 170_910_000, "depth": 9}
    path = folder / f"{model}-{mask}-{img_size}px-{num_classes}c.json"
    path.write_text(json.dumps(record))
    return path


@pytest.fixture()
def grid(tmp_path: Path) -> dict:
    """cifar10 and digits x vit, swin x none, gmm x seeds 0, 1."""
    runs, measures = tmp_path / "runs", tmp_path / "measure"
    metrics = [write_cell(runs, d, m, k, s) for d in ("cifar10", "digits") for m in ("vit", "swin")
               for k in ("none", "gmm") for s in (0, 1)]
    measure_files = [write_measure(measures, m, k) for m in ("vit", "swin") for k in ("none", "gmm")]
    return {"runs": runs, "metrics": metrics, "measures": measure_files, "out": tmp_path / "out"}


def md_rows(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Columns and {row label: {column: cell}} of the markdown table in ``path``."""
    lines = [l for l in path.read_text().splitlines() if l.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    columns = split(lines[0])
    return columns, {split(l)[0]: dict(zip(columns, split(l))) for l in lines[2:]}


def digits_vit(tmp_path: Path, seeds: dict[str, list[int]], **per_cell) -> Path:
    """digits x vit x the masks and seeds given; per_cell[(mask, seed)] overrides that record."""
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", mask, s, **per_cell.get(f"{mask}{s}", {}))
               for mask, ss in seeds.items() for s in ss]
    report.report(metrics, tmp_path / "out", [write_measure(tmp_path / "m", "vit", k) for k in seeds])
    return tmp_path / "out"


# ---------------------------------------------------------------- the tidy table


def test_tidy_table_is_the_records(grid: dict) -> None:
    table = report.report([grid["runs"]], grid["out"], [m.parent for m in grid["measures"]][:1])
    csv = pd.read_csv(grid["out"] / "table.csv")
    assert len(csv) == len(table) == 16
    for path in grid["metrics"]:
        record = json.loads(path.read_text())
        row = csv[csv["metrics"] == str(path)]
        assert len(row) == 1, path
        for key in ("dataset", "model", "mask", "seed", "selection", "selected_top1", "selected_epoch",
                    "val_top1", "best_top1", "last_top1", "best_epoch", "params", "source_hash",
                    "cpu_capability", "n_train", "learned"):
            assert row[key].item() == record[key], key
        assert row["torch_version"].item() == "2.14.1" and row["cuda_version"].item() == "none"
        # measured columns come from the measure with this model, mask, image size and classes
        assert row["macs_all"].item() == 200_000_000 + PARAMS[(record["model"], record["mask"])]
        assert row["depth"].item() == 9
    # paired difference to the unmasked cell of the same dataset, model and seed
    gmm = csv[(csv["mask"] == "gmm")]
    for metric in ("selected_top1", "best_top1", "last_top1"):
        assert gmm[f"{metric}_vs_none"].tolist() == pytest.approx([0.5] * len(gmm))
    assert csv[csv["mask"] == "none"]["best_top1_vs_none"].tolist() == pytest.approx([0.0] * 8)
    # the paper's figure where it reports the cell (GMM-ViT on CIFAR-10: 95.06, +1.41 over ViT)
    vit_gmm = csv[(csv["model"] == "vit") & (csv["mask"] == "gmm") & (csv["dataset"] == "cifar10")]
    assert vit_gmm["paper_top1"].tolist() == [95.06, 95.06]
    assert vit_gmm["paper_vs_none"].iloc[0] == pytest.approx(1.41)
    assert csv[csv["dataset"] == "digits"]["paper_top1"].isna().all()


def test_t_interval_known_answer() -> None:
    mean, half, n = report.t_interval([1.0, 2.0, 3.0])  # std 1: half-width t(0.975, 2) / sqrt(3)
    assert (mean, n) == (2.0, 3) and half == pytest.approx(T_975_2 / math.sqrt(3)) == pytest.approx(2.484, abs=1e-3)
    assert math.isnan(report.t_interval([5.0])[1])  # one value: no interval


# ---------------------------------------------------------------- the three tables


def test_markdown_table_layout_and_numbers(grid: dict) -> None:
    report.report(grid["metrics"], grid["out"], grid["measures"], grid="demo")
    for name, metric, paper in (("table.md", 0, False), ("table_best.md", 1, True), ("table_last.md", 2, False)):
        columns, rows = md_rows(grid["out"] / name)
        assert list(rows) == ["ViT", "GMM-ViT", "Swin", "GMM-Swin"], name  # the paper's order and names
        # the paper's figures (best test epoch) only beside our best test epoch
        assert columns == ["Model", "CIFAR-10", *["CIFAR-10 (paper)"] * paper, "Digits", "Params",
                           "MACs (fvcore)", "MACs (paper conv.)", "Depth"], name
        for dataset, column in (("cifar10", "CIFAR-10"), ("digits", "Digits")):
            for model, label in (("vit", "ViT"), ("swin", "Swin")):
                seeds = pd.Series([top1(dataset, model, "none", s)[metric] for s in (0, 1)])
                mean, std = seeds.mean(), seeds.std()
                assert rows[label][column] == f"{mean:.2f} ± {std:.2f} (n=2)", (name, label)
                # same +0.5 for both seeds: the paired interval has zero width
                assert rows[f"GMM-{label}"][column] == f"{mean + 0.5:.2f} ± {std:.2f} (n=2) [+0.50 ± 0.00]"
    _, rows = md_rows(grid["out"] / "table_best.md")
    assert rows["GMM-ViT"]["CIFAR-10 (paper)"] == "95.06"  # one published run: no difference claimed
    assert rows["Swin"]["CIFAR-10 (paper)"] == "95.26"
    assert rows["GMM-ViT"]["Params"] == "2.69M (2.7M)"
    assert rows["ViT"]["MACs (paper conv.)"] == "170.91M (170.9M)"
    assert rows["ViT"]["MACs (fvcore)"] == "202.69M"
    assert rows["ViT"]["Depth"] == "9"
    text = (grid["out"] / "table.md").read_text()
    assert "Grid: `demo`" in text
    # a recipe key that differs by dataset is stated per dataset
    assert "for cifar10: limit_train=0" in text and "for digits: limit_train=64" in text
    # the MACs column says what fvcore counts and what it does not
    assert "MACs (all ops)" not in text
    assert re.search(r"MACs \(fvcore\): fvcore's count of matrix products.*attention products.*"
                     r"element-wise operations and softmax are not counted", text)


def test_paired_difference_is_a_t_interval_over_seeds(tmp_path: Path) -> None:
    """Differences 1, 2, 3 over three seeds -> [+2.00 ± 2.48]: t(0.975, 2) * std 1 / sqrt 3."""
    gmm = {f"gmm{s}": {"selected_top1": 50.0 + 10 * s + (s + 1)} for s in (0, 1, 2)}
    none = {f"none{s}": {"selected_top1": 50.0 + 10 * s} for s in (0, 1, 2)}
    out = digits_vit(tmp_path, {"none": [0, 1, 2], "gmm": [0, 1, 2]}, **gmm, **none)
    _, rows = md_rows(out / "table.md")
    assert rows["ViT"]["Digits"] == "60.00 ± 10.00 (n=3)"
    assert rows["GMM-ViT"]["Digits"] == f"62.00 ± 11.00 (n=3) [+2.00 ± {T_975_2 / math.sqrt(3):.2f}]"
    assert rows["GMM-ViT"]["Digits"].endswith("[+2.00 ± 2.48]")


def test_difference_pairs_only_seeds_present_for_both(tmp_path: Path) -> None:
    """Seed 2 has no unmasked twin: the difference is over seeds 0 and 1 (4 and 6), not of the means."""
    gmm = {f"gmm{s}": {"selected_top1": v} for s, v in ((0, 54.0), (1, 66.0), (2, 99.0))}
    none = {f"none{s}": {"selected_top1": v} for s, v in ((0, 50.0), (1, 60.0))}
    out = digits_vit(tmp_path, {"none": [0, 1], "gmm": [0, 1, 2]}, **gmm, **none)
    _, rows = md_rows(out / "table.md")
    half = 12.706204736174698 * math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * std(4, 6) / sqrt(2)
    assert rows["GMM-ViT"]["Digits"].endswith(f"(n=3) [+5.00 ± {half:.2f}, 2 pairs]")


def test_single_seed_claims_no_difference(tmp_path: Path) -> None:
    out = digits_vit(tmp_path, {"none": [0], "gmm": [0]})
    _, rows = md_rows(out / "table.md")
    assert rows["ViT"]["Digits"] == f"{top1('digits', 'vit', 'none', 0)[0]:.2f} (n=1)"
    assert rows["GMM-ViT"]["Digits"] == f"{top1('digits', 'vit', 'gmm', 0)[0]:.2f} (n=1)"  # no [+0.50]


def test_not_learned_cell_is_flagged_and_never_a_baseline(tmp_path: Path) -> None:
    failed = {"learned": False, "not_learned_reason": "train loss 2.29 within 5% of ln 10",
              "selected_top1": 17.22, "best_top1": 17.22, "last_top1": 17.22}
    out = digits_vit(tmp_path, {"none": [0], "gmm": [0]}, none0=failed)
    _, rows = md_rows(out / "table.md")
    assert rows["ViT"]["Digits"] == "17.22 ✗"
    assert rows["GMM-ViT"]["Digits"] == f"{top1('digits', 'vit', 'gmm', 0)[0]:.2f} (n=1)"
    text = (out / "table.md").read_text()
    assert "✗: did not learn (train loss stayed at ln C / top-1 near chance); not used as a baseline" in text
    assert pd.read_csv(out / "table.csv")["selected_top1_vs_none"].isna().all()  # none against it


def test_not_learned_seeds_are_counted_and_left_out(tmp_path: Path) -> None:
    """Seed 2 of the unmasked model did not learn: its mean is over seeds 0, 1, the pairs too."""
    values = {"none": (50.0, 52.0, 11.0), "gmm": (51.0, 55.0, 70.0)}
    per_cell = {f"{m}{s}": {"selected_top1": v[s]} for m, v in values.items() for s in range(3)}
    per_cell["none2"] |= {"learned": False, "not_learned_reason": "top-1 below 1.5x chance"}
    out = digits_vit(tmp_path, {"none": [0, 1, 2], "gmm": [0, 1, 2]}, **per_cell)
    _, rows = md_rows(out / "table.md")
    std = pd.Series([50.0, 52.0]).std()
    assert rows["ViT"]["Digits"] == f"51.00 ± {std:.2f} (n=2, ✗ 1 of 3 seeds)"
    half = 12.706204736174698 * pd.Series([1.0, 3.0]).std() / math.sqrt(2)
    gmm_std = pd.Series([51.0, 55.0, 70.0]).std()
    assert rows["GMM-ViT"]["Digits"] == f"58.67 ± {gmm_std:.2f} (n=3) [+2.00 ± {half:.2f}, 2 pairs]"


def test_not_learned_inferred_for_older_records_from_history(tmp_path: Path) -> None:
    """An older record has no verdict: its history's last train loss at ln C (10 classes) says it."""
    runs = tmp_path / "runs"
    metrics = [write_cell(runs, "digits", "vit", k, 0, legacy=True) for k in ("none", "gmm")]
    history = pd.read_csv(metrics[0].with_name("history.csv")).assign(train_loss=[2.31, 2.30, 2.30])
    history.to_csv(metrics[0].with_name("history.csv"), index=False)
    table = report.report(metrics, tmp_path / "out", [write_measure(tmp_path / "m", "vit", k) for k in ("none", "gmm")])
    assert table.set_index("mask")["learned"].to_dict() == {"none": False, "gmm": True}
    _, rows = md_rows(tmp_path / "out" / "table.md")
    assert rows["ViT"]["Digits"].endswith("✗")


# ---------------------------------------------------------------- selection and provenance


def test_headline_is_the_validation_selected_epoch(grid: dict) -> None:
    report.report(grid["metrics"], grid["out"], grid["measures"])
    lines = (grid["out"] / "table.md").read_text().splitlines()
    assert lines[0] == "# Test top-1 (%) at the epoch selected on validation"
    assert "epoch selected on a validation split of 10% of the training set" in lines[2]
    best = (grid["out"] / "table_best.md").read_text().splitlines()
    assert "best test epoch" in best[0] and "optimistic" in best[0]


def test_headline_without_validation_split_says_it_is_the_best_test_epoch(tmp_path: Path) -> None:
    out = digits_vit(tmp_path, {"none": [0]}, none0={"selection": "test", "val_fraction": 0.0,
                                                     "val_top1": None, "n_val": 0, "selected_top1": 81.0})
    lines = (out / "table.md").read_text().splitlines()
    assert "best test epoch" in lines[0] and "optimistic" in lines[0]
    assert "best test epoch, as the paper: optimistic; the recipe holds out no validation split" in lines[2]
    assert "⚠" not in (out / "table.md").read_text()  # a complete, unmixed record: nothing to warn


def test_header_has_the_provenance(tmp_path: Path) -> None:
    out = digits_vit(tmp_path, {"none": [0, 1]}, none0={"slurm_job_id": "4242", "threads": 1},
                     none1={"slurm_job_id": "4243", "threads": 1})
    text = (out / "table.md").read_text()
    for expected in ("cpu (AVX512), 1 thread (2 cells)", "Hosts: node1", "SLURM: 2 jobs (4242, 4243)",
                     "torch 2.14.1; timm 1.0.31; CUDA none; cuDNN none; python 3.11.2; gmmvit 0.1.0",
                     "Source hashes (of the code each cell runs): 1 over 1 model x mask pair.", "Dataset fingerprints: digits fp-digits",
                     "Deterministic algorithms: yes (all cells)",
                     "digits: n_train 1132, n_val 125, n_test 540", "Training wall time 2.0 min",
                     "per cell 1.0 min median (1.0-1.0)", "training images/s per cell, median by model: vit 100."):
        assert expected in text, expected
    for name in ("table_best.md", "table_last.md"):  # every table carries it
        assert "cpu (AVX512), 1 thread" in (out / name).read_text()


def test_mixed_sources_and_machines_are_said_prominently(tmp_path: Path) -> None:
    out = digits_vit(tmp_path, {"none": [0, 1], "gmm": [0, 1]},
                     none1={"source_hash": "def456", "cpu_capability": "AVX2"},
                     gmm1={"versions": {"torch": "2.13.0", "timm": "1.0.31"}})
    text = (out / "table.md").read_text()
    # the file opens with its table; the warnings come right after it, before the provenance
    assert text.index("| Model") < text.index("⚠ mixed") < text.index("Recipe:")
    notes = text[text.rindex("|\n"):]
    # a cell's hash covers the code it runs: only cells of one model x mask must agree
    assert ("⚠ mixed: cells come from 2 different versions of the vit none code (source hashes): "
            "abc123 (1 cell); def456 (1 cell).") in notes
    assert "versions of the vit gmm code" not in notes
    assert "⚠ mixed: cells come from 2 different CPU capabilities: AVX512 (3 cells); AVX2 (1 cell)." in notes
    assert "2 different torch versions" in notes
    assert "numerics settings" not in notes and "CPU models under native" not in notes


def test_mixed_numerics_and_cpu_models_under_native_are_warned(tmp_path: Path) -> None:
    intel = {"vendor": "GenuineIntel", "model_name": "Intel Xeon", "family": 6, "model": 143,
             "stepping": 8, "flags": ["avx2"], "l2_kib": 2048, "l3_kib": 107520}
    # portable cells on two CPU models: their bits do not depend on it, nothing to warn
    out = digits_vit(tmp_path / "a", {"none": [0, 1], "gmm": [0, 1]}, none1={"cpu": intel})
    text = (out / "table.md").read_text()
    assert "⚠" not in text
    assert ("Numerics: portable (4 cells) (MKL COMPATIBLE, ATen AVX2, oneDNN off, one thread, fused "
            "AdamW: the same bits on any x86-64 CPU with AVX2") in text
    assert ("CPU models: AMD EPYC 7B13 (AuthenticAMD family 25 model 1 stepping 1) (3 cells); "
            "Intel Xeon (GenuineIntel family 6 model 143 stepping 8) (1 cell).") in text
    # native cells on two CPU models, and a mix of numerics: both warned
    out = digits_vit(tmp_path / "b", {"none": [0, 1], "gmm": [0, 1]},
                     none0={"numerics": "native"}, none1={"numerics": "native", "cpu": intel})
    text = (out / "table.md").read_text()
    assert ("⚠ mixed: cells come from 2 different numerics settings (portable and native kernels give "
            "other bits): native (2 cells); portable (2 cells).") in text
    assert ("⚠ mixed: cells come from 2 different CPU models under native (or unknown) numerics, whose "
            "kernels give other bits on each: AMD EPYC 7B13 (AuthenticAMD family 25 model 1 stepping 1) "
            "(1 cell); Intel Xeon (GenuineIntel family 6 model 143 stepping 8) (1 cell).") in text


def test_older_records_load_and_say_their_provenance_is_incomplete(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    metrics = [write_cell(runs, "digits", "vit", k, s, legacy=True) for k in ("none", "gmm") for s in (0, 1)]
    table = report.report(metrics, tmp_path / "out", [write_measure(tmp_path / "m", "vit", k) for k in ("none", "gmm")])
    # no selection recorded: the best test epoch, and said so
    assert (table["selection"] == "test").all() and (table["selected_top1"] == table["best_top1"]).all()
    text = (tmp_path / "out" / "table.md").read_text()
    assert "⚠ provenance incomplete: 4 of 4 cells come from records written by older code" in text
    assert "source_hash" in text.split("⚠ provenance incomplete")[1].split("\n")[0]
    assert "best test epoch" in text.splitlines()[0]
    assert "Source hashes (of the code each cell runs): unknown" in text and "cpu (CPU capability unknown), 2 threads" in text


# ---------------------------------------------------------------- plots


def test_plots_are_pngs_titled_with_device_and_selection(grid: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    titles: dict[str, str] = {}
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        # drawn to its temporary file beside its place (.<name>.tmp-<pid>), renamed once all are done
        name = re.fullmatch(r"\.(.+)\.png\.tmp-\d+", Path(path).name)[1]
        titles[name] = fig._suptitle.get_text() if fig._suptitle else ""
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    report.report([grid["runs"]], grid["out"], grid["measures"])
    assert report.PLOTS == ("accuracy", "paired_difference", "learning_curves", "vs_paper")
    for name in report.PLOTS:
        data = (grid["out"] / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        assert "cpu (AVX512), 2 threads" in titles[name], name
    for name in ("accuracy", "paired_difference"):
        assert "epoch selected on 10% validation split" in titles[name], name
    assert "validation (dashed)" in titles["learning_curves"]


def test_plots_without_baseline_or_paper_cells_are_still_written(tmp_path: Path) -> None:
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", "gmm", 0)]
    report.report(metrics, tmp_path / "out", [])
    for name in report.PLOTS:
        assert (tmp_path / "out" / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    _, rows = md_rows(tmp_path / "out" / "table_best.md")
    assert rows["GMM-ViT"]["Params"] == "— (2.7M)"  # not measured: said, not invented; paper beside


def test_two_records_for_one_cell_fail(tmp_path: Path) -> None:
    path = write_cell(tmp_path / "a", "digits", "vit", "none", 0)
    copy = write_cell(tmp_path / "b", "digits", "vit", "none", 0)
    with pytest.raises(report.ReportError, match="several records for one cell"):
        report.report([path, copy], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_main_reads_folders(grid: dict, capsys: pytest.CaptureFixture) -> None:
    measures = grid["measures"][0].parent
    assert report.main([str(grid["runs"]), "--measures", str(measures), "--out-dir", str(grid["out"])]) == 0
    assert "16 cells" in capsys.readouterr().out
    assert len(pd.read_csv(grid["out"] / "table.csv")) == 16
    assert all((grid["out"] / name).is_file() for name in report.TABLES)


# ---------------------------------------------------------------- what ran where: the scheduler line


def scheduler_line(out: Path) -> str:
    return next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("Run on:"))


def test_header_summarises_slurm_jobs_nodes_cpus_and_gpus(tmp_path: Path) -> None:
    slurm = {"granted_cpus": 2, "gpu_ids": None, "device_slot": None}
    out = digits_vit(tmp_path, {"none": [0, 1, 2], "gmm": [0]},
                     none0=slurm | {"slurm_job_id": "4242", "slurm_node": "a", "gpu_ids": "0"},
                     none1=slurm | {"slurm_job_id": "4243", "slurm_node": "b", "gpu_ids": "1"},
                     none2=slurm | {"slurm_job_id": "4244", "slurm_node": "a", "granted_cpus": 4, "gpu_ids": "1"},
                     gmm0={"device_slot": "1:0", "gpu_ids": "1"})  # a local GPU run, outside SLURM
    line = scheduler_line(out)
    assert ("SLURM: 3 jobs (4242, 4243, 4244) on nodes a, b; CPUs granted per job: 2 (2 cells), "
            "4 (1 cell); 1 cell outside SLURM.") in line, line
    assert ("GPUs: CUDA_VISIBLE_DEVICES 0 (1 cell), 1 (3 cells); local device slots (device:k) "
            "1:0 (1 cell).") in line, line


def test_header_says_when_nothing_was_scheduled_or_nothing_is_known(tmp_path: Path) -> None:
    line = scheduler_line(digits_vit(tmp_path / "plain", {"none": [0]}))
    assert line.endswith("SLURM: none. GPUs: none."), line
    metrics = [write_cell(tmp_path / "old", "digits", "vit", "none", 0, legacy=True)]
    report.report(metrics, tmp_path / "old-out")
    line = scheduler_line(tmp_path / "old-out")
    assert line.endswith("SLURM: unknown (older records). GPUs: unknown (older records)."), line


# ---------------------------------------------------------------- accuracy against K


def kernel_grid(tmp_path: Path) -> Path:
    """digits x vit: none, gmm-k1, gmm-k3 over seeds 0-2, bare gmm trained at mask_kernels 4 (one
    seed), elm (no K); known values per seed."""
    values = {"none": (50.0, 50.0, 50.0), "gmm-k1": (60.0, 61.0, 62.0), "gmm-k3": (70.0, 72.0, 74.0),
              "elm": (40.0, 41.0, 42.0)}
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", mask, seed, selected_top1=v)
               for mask, vs in values.items() for seed, v in enumerate(vs)]
    metrics.append(write_cell(tmp_path / "runs", "digits", "vit", "gmm", 0, selected_top1=80.0,
                              recipe_config={"epochs": 3, "mask_kernels": 4}))
    report.report(metrics, tmp_path / "out")
    return tmp_path / "out"


def test_kernel_summary_known_answers(tmp_path: Path) -> None:
    out = kernel_grid(tmp_path)
    table = pd.read_csv(out / "table.csv")
    summary = report.kernel_summary(table)
    # elm has no K; the bare gmm counts at its recipe's mask_kernels (4)
    assert summary[["family", "kernels", "n"]].values.tolist() == [["gmm", 1, 3], ["gmm", 3, 3], ["gmm", 4, 1]]
    assert summary["mean"].tolist() == pytest.approx([61.0, 72.0, 80.0])
    # std 1 and 2 over 3 seeds: t(0.975, 2) * std / sqrt(3); one seed: no interval
    assert summary["half_width"].iloc[:2].tolist() == pytest.approx([T_975_2 / math.sqrt(3), 2 * T_975_2 / math.sqrt(3)])
    assert math.isnan(summary["half_width"].iloc[2])
    assert summary["none_mean"].tolist() == pytest.approx([50.0] * 3)
    assert (out / "plots" / "kernels.png").read_bytes().startswith(PNG_MAGIC)


def test_kernel_summary_leaves_out_seeds_that_did_not_learn(tmp_path: Path) -> None:
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", "gmm-k3", s, selected_top1=v)
               for s, v in enumerate((70.0, 74.0))]
    metrics.append(write_cell(tmp_path / "runs", "digits", "vit", "gmm-k3", 2, selected_top1=11.0,
                              learned=False, not_learned_reason="top-1 near chance"))
    table = report.report(metrics, tmp_path / "out")
    summary = report.kernel_summary(table)
    assert summary[["kernels", "n", "not_learned"]].values.tolist() == [[3, 2, 1]]
    assert summary["mean"].item() == 72.0 and math.isnan(summary["none_mean"].item())


def test_no_kernels_plot_without_k_variants(grid: dict) -> None:
    report.report(grid["metrics"], grid["out"], grid["measures"])
    assert not report.has_kernel_variants(["none", "gmm", "elm", "gmm_add"])
    assert report.has_kernel_variants(["none", "gmm-k3"])
    assert not (grid["out"] / "plots" / "kernels.png").exists()


# ---------------------------------------------------------------- what the masks learned


def by_distance_reference(values: np.ndarray, grid: int) -> dict[float, list[list[float]]]:
    """Per distance: the values of each head at every pair of patches that far apart (loops)."""
    found: dict[float, list[list[float]]] = {}
    for i in range(grid * grid):
        for j in range(grid * grid):
            distance = math.hypot(i // grid - j // grid, i % grid - j % grid)
            found.setdefault(round(distance, 9), []).append([float(v) for v in values[:, i, j]])
    return found


def test_mask_by_distance_evaluates_the_mixture_at_every_distance_of_the_grid() -> None:
    import torch

    from gmmvit.masks import build_mask

    mask = build_mask("gmm-k2", grid=5, num_heads=3)
    alpha = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    sigma = torch.tensor([[0.7, 2.0, 5.0], [3.0, -1.5, 0.4]])  # unconstrained: a negative sigma is allowed
    with torch.no_grad():
        mask.alpha.copy_(alpha)
        mask.sigma.copy_(sigma)
    distances, mean, low, high = report.mask_by_distance(mask)
    # the distances that occur on a 5x5 grid: sqrt(dy^2 + dx^2), dy, dx in 0..4
    expected = sorted({math.hypot(dy, dx) for dy in range(5) for dx in range(5)})
    assert distances.tolist() == pytest.approx(expected)
    a, s = alpha.double().numpy(), sigma.double().numpy()
    for h in range(3):
        mixture = [sum(a[k, h] * math.exp(-d * d / (2 * (s[k, h] ** 2 + 1e-5))) for k in range(2))
                   for d in expected]
        assert mean[h].tolist() == pytest.approx(mixture, rel=1e-5, abs=1e-6)
    assert np.allclose(low, mean, atol=1e-6) and np.allclose(high, mean, atol=1e-6)  # distance alone
    # around the centre patch (2, 2): the mixture at each patch's distance from it
    centre = report.mask_around_centre(mask)
    assert centre.shape == (3, 5, 5)
    d = math.hypot(0 - 2, 1 - 2)
    assert centre[1, 0, 1] == pytest.approx(sum(a[k, 1] * math.exp(-d * d / (2 * (s[k, 1] ** 2 + 1e-5)))
                                                for k in range(2)), rel=1e-5)


def test_mask_by_distance_averages_elm_and_keeps_its_spread() -> None:
    import torch

    from gmmvit.masks import build_mask

    mask = build_mask("elm", grid=4, num_heads=6)
    with torch.no_grad():
        mask.weight.copy_(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    distances, mean, low, high = report.mask_by_distance(mask)
    assert mean.shape == (1, len(distances))  # one matrix shared by the heads: one profile
    reference = by_distance_reference(mask.weight.detach().double().numpy()[None], 4)
    assert [round(d, 9) for d in distances] == sorted(reference)
    for column, distance in enumerate(sorted(reference)):
        values = [v[0] for v in reference[distance]]
        assert mean[0, column] == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert (low[0, column], high[0, column]) == pytest.approx((min(values), max(values)))


def test_a_temperature_is_one_factor_per_head() -> None:
    import torch

    from gmmvit.masks import build_mask

    mask = build_mask("temperature", grid=4, num_heads=3)
    mask.set_logit_scale(0.125)
    with torch.no_grad():
        mask.temperature.copy_(torch.tensor([0.125, 0.25, 0.0625]))
    values = report.mask_values(mask)
    assert report.is_per_head_constant(values)
    assert values.reshape(-1).tolist() == pytest.approx([1.0, 2.0, 0.5])  # tau_h / s


@pytest.fixture(scope="module")
def smoke_cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cell: `gmmvit train` with the smoke recipe for one epoch, digits, ViT, GMM (~10 s)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke") / "runs" / "smoke" / "digits" / "vit-gmm" / "seed0"
    gmmvit = Path(sys.executable).with_name("gmmvit")
    subprocess.run([str(gmmvit), "train", "--dataset", "digits", "--model", "vit", "--mask", "gmm",
                    "--seed", "0", "--recipe", "smoke", "--set", "epochs=1", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.slow
def test_mask_figures_come_from_a_real_cells_saved_parameters(smoke_cell: Path, tmp_path: Path) -> None:
    import torch

    table = report.report([smoke_cell / "metrics.json"], tmp_path / "out")
    figure = tmp_path / "out" / "plots" / "masks" / "vit-gmm.png"
    data = figure.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 50_000  # 9 layer panels and 24 heat maps
    assert report.mask_figure_cells(table)["mask"].tolist() == ["gmm"]

    record = json.loads((smoke_cell / "metrics.json").read_text())
    saved = torch.load(smoke_cell / "mask_params.pt", weights_only=True)
    masks = report.rebuild_masks(record, saved)
    assert [name for name, _ in masks] == [f"blocks.{i}.attn.mask" for i in range(9)]
    for name, mask in masks:
        # the trained values, not a fresh initialisation: the profile is the saved mixture's
        alpha, sigma = saved[f"{name}.alpha"].double(), saved[f"{name}.sigma"].double()
        assert alpha.shape == (5, 12)  # K from the smoke recipe's mask_kernels, 12 heads
        distances, mean, _, _ = report.mask_by_distance(mask)
        d2 = torch.tensor(distances, dtype=torch.float64) ** 2
        expected = (alpha[:, :, None] * torch.exp(-d2 / (2 * (sigma[:, :, None] ** 2 + 1e-5)))).sum(0)
        assert torch.allclose(torch.from_numpy(mean), expected, rtol=1e-5, atol=1e-5), name


@pytest.mark.slow
def test_mask_parameters_that_do_not_fit_the_model_are_refused(smoke_cell: Path) -> None:
    import torch

    record = json.loads((smoke_cell / "metrics.json").read_text())
    saved = torch.load(smoke_cell / "mask_params.pt", weights_only=True)
    with pytest.raises(ValueError, match="does not fit vit with mask gmm-k3"):
        report.rebuild_masks(record | {"mask": "gmm-k3"}, saved)  # alpha is (5, 12), K=3 wants (3, 12)
    del saved["blocks.8.attn.mask.sigma"]
    with pytest.raises(ValueError, match="missing.*blocks.8.attn.mask.sigma"):
        report.rebuild_masks(record, saved)


def test_a_record_without_mask_parameters_gets_a_figure_that_says_so(tmp_path: Path) -> None:
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", m, 0) for m in ("none", "gmm")]
    report.report(metrics, tmp_path / "out")
    figures = sorted(p.name for p in (tmp_path / "out" / "plots" / "masks").iterdir())
    assert figures == ["vit-gmm.png"]  # masked models only


def test_seeds_a_difference_needs_against_hand_computed_values():
    # paired differences 1, 2, 3: mean 2, s = 1, n = 3; t(0.975, 2) = 4.302653, so these seeds
    # resolve 4.302653 / sqrt(3) = 2.484138 and not 2. Seeds m that would: t(0.975, m-1) / sqrt(m) < 2:
    # m = 3 gives 2.484138, m = 4 gives t(0.975, 3) = 3.182446 / 2 = 1.591223: 4 seeds
    resolvable, needed, n = report.seeds_needed([1.0, 2.0, 3.0])
    assert n == 3 and resolvable == pytest.approx(2.484138, abs=1e-6) and needed == 4
    # 4, 5, 6: the same spread, mean 5 > 2.48: resolved with 3 (m = 2: 12.706205 / sqrt(2) = 8.98 > 5)
    assert report.seeds_needed([4.0, 5.0, 6.0])[1] == 3
    # -1, 0, 4: mean 1, s = sqrt(7) = 2.645751; t(0.975, m-1) / sqrt(m) < 0.377964 first at m = 30
    # (m = 29: 2.048407 / 5.385165 = 0.380380; m = 30: 2.045230 / 5.477226 = 0.373406)
    assert report.seeds_needed([-1.0, 0.0, 4.0])[1] == 30
    assert report.seeds_needed([2.0])[1:] == (None, 1) and math.isnan(report.seeds_needed([2.0])[0])
    assert report.seeds_needed([-1.0, 1.0])[1] is None  # mean 0: nothing to resolve


def test_every_paired_comparison_says_how_many_seeds_it_needs(tmp_path: Path) -> None:
    base = {f"none{s}": {"selected_top1": 90.0} for s in range(3)}
    gmm = {f"gmm{s}": {"selected_top1": 91.0 + s} for s in range(3)}  # differences 1, 2, 3
    out = digits_vit(tmp_path, {"none": [0, 1, 2], "gmm": [0, 1, 2]}, **base, **gmm)
    table = pd.read_csv(out / "table.csv")
    masked, unmasked = table[table["mask"] == "gmm"], table[table["mask"] == "none"]
    assert masked["selected_top1_seeds_needed"].tolist() == [4, 4, 4]
    assert masked["selected_top1_resolvable"].tolist() == pytest.approx([2.4841] * 3, abs=1e-4)
    assert unmasked["selected_top1_seeds_needed"].isna().all()
    text = (out / "table.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("Seeds a difference needs"))
    assert "GMM-ViT ±2.48, needs 4." in line
    assert text.index("| Model") < text.index("Seeds a difference needs") < text.index("Cells: with n")
    assert "Seeds a difference needs" in (out / "tables.html").read_text()


# ---------------------------------------------------------------- one-line errors, all-or-nothing outputs


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, hidden ones (a leftover temporary file) included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reported(tmp_path: Path, out: Path | None = None) -> tuple[list[Path], Path, dict[str, bytes]]:
    """digits x vit x none, gmm x seeds 0, 1, reported once: (records, out, the outputs' bytes)."""
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", k, s) for k in ("none", "gmm") for s in (0, 1)]
    out = out or tmp_path / "out"
    report.report(metrics, out)
    return metrics, out, snapshot(out)


def change_record(path: Path, **fields) -> None:
    """Edit a record, so that a new report of it differs from the last."""
    path.write_text(json.dumps(json.loads(path.read_text()) | (fields or {"selected_top1": 12.5})))


def fails_in_one_line(argv: list, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """report.main(argv) returns 2 and says one line, holding ``fragments``, without a traceback."""
    assert report.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("gmmvit report: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_report_errors_are_user_errors() -> None:
    from gmmvit.errors import UserError

    assert issubclass(report.ReportError, UserError) and report.ReportError.exit_code == 2


def test_a_missing_or_empty_results_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    fails_in_one_line([tmp_path / "nope", "--out-dir", out], capsys,
                      f"RUN {tmp_path / 'nope'}: no such file or folder", "e.g. results/runs")
    (tmp_path / "empty").mkdir()
    fails_in_one_line([tmp_path / "empty", "--out-dir", out], capsys,
                      f"no metrics.json under {tmp_path / 'empty'}", "train the cells first")
    cell = write_cell(tmp_path / "runs", "digits", "vit", "none", 0)
    fails_in_one_line([cell, "--measures", tmp_path / "nope", "--out-dir", out], capsys,
                      f"--measures {tmp_path / 'nope'}: no such file or folder")
    assert not out.exists()  # refused before anything was written


def test_a_broken_record_is_named_and_the_last_report_stays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics, out, before = reported(tmp_path)
    change_record(metrics[0])  # the new report would differ: what stays is the old one
    metrics[1].write_text('{"dataset": "digits", "model": ')  # cut short
    fails_in_one_line([tmp_path / "runs", "--out-dir", out], capsys,
                      f"{metrics[1]}: not valid JSON (Expecting value: line 1 column 32)", "retrain its cell")
    assert snapshot(out) == before
    metrics[1].write_text("[1, 2]")
    fails_in_one_line([tmp_path / "runs", "--out-dir", out], capsys, f"{metrics[1]}: a JSON list, not an object")
    measure = write_measure(tmp_path / "m", "vit", "none")
    measure.write_bytes(b"\xff\xfe")
    fails_in_one_line([metrics[0], "--measures", measure, "--out-dir", out], capsys,
                      f"{measure}: not a text file", "gmmvit measure")
    assert snapshot(out) == before


def test_two_records_of_one_cell_are_one_line_and_the_last_report_stays(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    metrics, out, before = reported(tmp_path)
    twin = write_cell(tmp_path / "elsewhere", "digits", "vit", "none", 0)
    fails_in_one_line([tmp_path / "runs", twin, "--out-dir", out], capsys, "several records for one cell: ",
                      str(metrics[0]), str(twin), "remove the extra records")
    assert snapshot(out) == before


def test_a_bug_keeps_its_traceback_and_the_last_report_stays(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the tables and plots are written (to their temporary files): none replaces
    the last report's, and the temporary files are gone."""
    metrics, out, before = reported(tmp_path)
    change_record(metrics[0])

    def bug(table, outputs):
        assert list(out.glob(".table.md.tmp-*")) and list(out.glob("plots/.accuracy.png.tmp-*"))
        raise KeyError("a bug")

    monkeypatch.setattr(report.command, "write_mask_figures", bug)
    with pytest.raises(KeyError, match="a bug"):
        report.main([str(tmp_path / "runs"), "--out-dir", str(out)])
    assert snapshot(out) == before


@pytest.mark.parametrize("how", ["--debug", "GMMVIT_DEBUG=1"])
def test_debug_shows_the_traceback_too(how: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")]
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("GMMVIT_DEBUG", "1")
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ReportError" in err
    assert err.splitlines()[-1].startswith("gmmvit report: error: RUN ")


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A 4 MiB tmpfs (a disk that really fills up), for root where mount works; else skipped."""
    import os
    import subprocess

    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_the_last_report_stays(tmp_path: Path, small_tmpfs: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import errno

    metrics, out, before = reported(tmp_path, small_tmpfs / "out")
    change_record(metrics[0])
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # fill the disk ...
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    # ... then free room for the tables, not for the plots: the report fails half way through
    tables = sum(len(data) for name, data in before.items() if name in report.TABLES)
    with open(filler, "r+b") as f:
        f.truncate(filler.stat().st_size - tables - 16384)
    fails_in_one_line([tmp_path / "runs", "--out-dir", out], capsys,
                      f"cannot write {out / 'plots'}/", "no space left on the device")
    assert snapshot(out) == before
    filler.unlink()  # with room again, the next report replaces the whole set
    assert report.main([str(tmp_path / "runs"), "--out-dir", str(out)]) == 0
    after = snapshot(out)
    assert after.keys() == before.keys() and after["table.csv"] != before["table.csv"]


def test_a_read_only_folder_is_one_line_and_the_last_report_stays(tmp_path: Path, small_tmpfs: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import subprocess

    metrics, out, before = reported(tmp_path, small_tmpfs / "out")
    change_record(metrics[0])
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    fails_in_one_line([tmp_path / "runs", "--out-dir", out], capsys,
                      f"cannot write {out / 'table.md'}: the file system is read-only")
    assert snapshot(out) == before


def test_a_killed_report_leaves_the_last_one_and_the_next_removes_its_temporary_files(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    metrics, out, before = reported(tmp_path)
    change_record(metrics[0])
    # killed (SIGKILL: no clean-up) once its tables and plots are on disk, under temporary names
    kill = ("import os, signal, sys\nfrom gmmvit import report\n"
            "report.command.write_mask_figures = lambda *_: os.kill(os.getpid(), signal.SIGKILL)\n"
            "report.main(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", kill, str(tmp_path / "runs"), "--out-dir", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    left = {name for name in snapshot(out) if ".tmp-" in name}
    assert {".table.md.tmp-", "plots/.accuracy.png.tmp-"} <= {re.sub(r"\d+$", "", n) for n in left}
    assert {k: v for k, v in snapshot(out).items() if k not in left} == before
    live = out / f".table_best.md.tmp-{os.getppid()}"  # a writer still running: left alone
    live.write_text("being written")
    assert report.main([str(tmp_path / "runs"), "--out-dir", str(out)]) == 0
    after = snapshot(out)
    assert after.keys() == before.keys() | {live.name}
    assert after["table.csv"] != before["table.csv"]


def test_the_commands_say_one_line(tmp_path: Path) -> None:
    """`gmmvit report` and `python -m gmmvit.report`, as the workflow and a user call them."""
    import subprocess
    import sys

    metrics, out, before = reported(tmp_path)
    metrics[1].write_text("{")
    gmmvit = Path(sys.executable).with_name("gmmvit")
    for command in ([str(gmmvit), "report"], [sys.executable, "-m", "gmmvit.report"]):
        run = subprocess.run([*command, str(tmp_path / "runs"), "--out-dir", str(out)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr == f"gmmvit report: error: {metrics[1]}: not valid JSON (Expecting property name " \
            "enclosed in double quotes: line 1 column 2); retrain its cell (remove the cell's folder and run " \
            "snakemake again), or leave it out of the report's inputs\n"
    assert snapshot(out) == before
