"""report.py on records written by hand: the tables' rows, columns and numbers come from the cells,
and every number they print is one the records support (known answers, computed here by hand)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
        + {"none": 0.0, "gmm": 0.5}[mask] + 0.25 * seed
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
        "params": PARAMS[(model, mask)], "wall_time_s": 60.0, "train_images_per_s": 100.0,
        "device": "cpu", "threads": 2,
        "versions": {"torch": "2.14.1", "timm": "1.0.31", "gmmvit": "0.1.0", "python": "3.11.2"},
        "recipe_config": {"epochs": 3, "lr": 0.001, "limit_train": 0 if dataset == "cifar10" else 64},
    }
    if not legacy:
        record |= {
            "selection": "val", "selected_epoch": 2, "selected_top1": selected, "val_top1": 75.0,
            "val_fraction": 0.1, "final_train_loss": 1.2, "chance_top1": 10.0, "learned": True,
            "not_learned_reason": None, "cpu_capability": "AVX512", "host": "node1", "slurm_job_id": None,
            "num_classes": 10, "img_size": 32, "n_train": 1132, "n_val": 125, "n_test": 540,
            "dataset_fingerprint": f"fp-{dataset}", "source_hash": "abc123", "deterministic": True,
        }
        record["versions"] |= {"cuda": None, "cudnn": None}
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
    for expected in ("cpu (AVX512), 1 thread (2 cells)", "Hosts: node1", "SLURM jobs: 4242, 4243",
                     "torch 2.14.1; timm 1.0.31; CUDA none; cuDNN none; python 3.11.2; gmmvit 0.1.0",
                     "Source hash: abc123", "Dataset fingerprints: digits fp-digits",
                     "Deterministic algorithms: yes (all cells)",
                     "digits: n_train 1132, n_val 125, n_test 540", "Training wall time 2.0 min"):
        assert expected in text, expected
    for name in ("table_best.md", "table_last.md"):  # every table carries it
        assert "cpu (AVX512), 1 thread" in (out / name).read_text()


def test_mixed_sources_and_machines_are_said_prominently(tmp_path: Path) -> None:
    out = digits_vit(tmp_path, {"none": [0, 1], "gmm": [0, 1]},
                     none1={"source_hash": "def456", "cpu_capability": "AVX2"},
                     gmm1={"source_hash": "def456", "versions": {"torch": "2.13.0", "timm": "1.0.31"}})
    text = (out / "table.md").read_text()
    head = text.split("| Model")[0]
    assert "⚠ mixed: cells come from 2 different source hashes: abc123 (2 cells); def456 (2 cells)." in head
    assert "⚠ mixed: cells come from 2 different CPU capabilities: AVX512 (3 cells); AVX2 (1 cell)." in head
    assert "2 different torch versions" in head
    # said before the rest of the provenance, right under the heading and selection
    assert text.index("⚠ mixed") < text.index("Recipe:")


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
    assert "Source hash: unknown" in text and "cpu (CPU capability unknown), 2 threads" in text


# ---------------------------------------------------------------- plots


def test_plots_are_pngs_titled_with_device_and_selection(grid: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    titles: dict[str, str] = {}
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        titles[Path(path).stem] = fig._suptitle.get_text() if fig._suptitle else ""
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
    with pytest.raises(ValueError, match="several records for one cell"):
        report.report([path, copy], tmp_path / "out")


def test_main_reads_folders(grid: dict, capsys: pytest.CaptureFixture) -> None:
    measures = grid["measures"][0].parent
    assert report.main([str(grid["runs"]), "--measures", str(measures), "--out-dir", str(grid["out"])]) == 0
    assert "16 cells" in capsys.readouterr().out
    assert len(pd.read_csv(grid["out"] / "table.csv")) == 16
    assert all((grid["out"] / name).is_file() for name in report.TABLES)
