"""report.py on records written by hand: the tables' rows, columns and numbers come from the cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from gmmvit import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (model, mask) -> (params at 32 px / 10 classes, at 32 px / 100 classes)
PARAMS = {("vit", "none"): 2_692_042, ("vit", "gmm"): 2_693_122,
          ("swin", "none"): 7_073_188, ("swin", "gmm"): 7_074_088}


def top1(dataset: str, model: str, mask: str, seed: int) -> tuple[float, float]:
    """Distinct, easily recomputed numbers per cell: (best, last)."""
    best = {"cifar10": 90.0, "digits": 80.0}[dataset] + {"vit": 1.0, "swin": 2.0}[model] \
        + {"none": 0.0, "gmm": 0.5}[mask] + 0.25 * seed
    return best, best - 1.5


def write_cell(runs: Path, dataset: str, model: str, mask: str, seed: int, recipe: str = "demo") -> Path:
    best, last = top1(dataset, model, mask, seed)
    out = runs / recipe / dataset / f"{model}-{mask}" / f"seed{seed}"
    out.mkdir(parents=True)
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2], "test_loss": [1.9, 1.4, 1.3],
                            "test_top1": [best - 10, best, last], "lr": [1e-3, 5e-4, 1e-6],
                            "images_per_s": [100.0, 101.0, 99.0]})
    history.to_csv(out / "history.csv", index=False)
    record = {
        "dataset": dataset, "model": model, "mask": mask, "seed": seed, "recipe": recipe,
        "best_top1": best, "best_epoch": 2, "last_top1": last, "epochs": 3,
        "params": PARAMS[(model, mask)] + (90 * (dataset == "cifar100")),
        "wall_time_s": 60.0, "train_images_per_s": 100.0, "device": "cpu", "threads": 2,
        "versions": {"torch": "2.14.1", "timm": "1.0.31", "gmmvit": "0.1.0", "python": "3.11.2"},
        "recipe_config": {"epochs": 3, "lr": 0.001, "limit_train": 0 if dataset == "cifar10" else 64},
    }
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


def test_tidy_table_is_the_records(grid: dict) -> None:
    table = report.report([grid["runs"]], grid["out"], [m.parent for m in grid["measures"]][:1])
    csv = pd.read_csv(grid["out"] / "table.csv")
    assert len(csv) == len(table) == 16
    for path in grid["metrics"]:
        record = json.loads(path.read_text())
        row = csv[csv["metrics"] == str(path)]
        assert len(row) == 1, path
        for key in ("dataset", "model", "mask", "seed", "best_top1", "last_top1", "best_epoch", "params"):
            assert row[key].item() == record[key], key
        # measured columns come from the measure with this model, mask and parameter count
        assert row["macs_all"].item() == 200_000_000 + PARAMS[(record["model"], record["mask"])]
        assert row["depth"].item() == 9
    # paired difference to the unmasked cell of the same dataset, model and seed
    gmm = csv[(csv["mask"] == "gmm")]
    assert gmm["best_top1_vs_none"].tolist() == pytest.approx([0.5] * len(gmm))
    assert csv[csv["mask"] == "none"]["best_top1_vs_none"].tolist() == pytest.approx([0.0] * 8)
    # the paper's figure where it reports the cell (GMM-ViT on CIFAR-10: 95.06, +1.41 over ViT)
    vit_gmm = csv[(csv["model"] == "vit") & (csv["mask"] == "gmm") & (csv["dataset"] == "cifar10")]
    assert vit_gmm["paper_top1"].tolist() == [95.06, 95.06]
    assert vit_gmm["paper_vs_none"].iloc[0] == pytest.approx(1.41)
    assert csv[csv["dataset"] == "digits"]["paper_top1"].isna().all()


def test_markdown_table_layout_and_numbers(grid: dict) -> None:
    report.report(grid["metrics"], grid["out"], grid["measures"], grid="demo")
    columns, rows = md_rows(grid["out"] / "table.md")
    assert list(rows) == ["ViT", "GMM-ViT", "Swin", "GMM-Swin"]  # the paper's order and names
    assert columns == ["Model", "CIFAR-10", "CIFAR-10 (paper)", "Digits", "Params", "MACs (all ops)",
                       "MACs (paper conv.)", "Depth"]
    for dataset, column in (("cifar10", "CIFAR-10"), ("digits", "Digits")):
        for model, label in (("vit", "ViT"), ("swin", "Swin")):
            seeds = [top1(dataset, model, "none", s)[0] for s in (0, 1)]
            mean, std = pd.Series(seeds).mean(), pd.Series(seeds).std()
            assert rows[label][column] == f"{mean:.2f} ± {std:.2f} (n=2)"
            assert rows[f"GMM-{label}"][column] == f"{mean + 0.5:.2f} ± {std:.2f} (n=2) [+0.50]"
    assert rows["GMM-ViT"]["CIFAR-10 (paper)"] == "95.06 [+1.41]"
    assert rows["Swin"]["CIFAR-10 (paper)"] == "95.26"
    assert rows["GMM-ViT"]["Params"] == "2.69M (2.7M)"
    assert rows["ViT"]["MACs (paper conv.)"] == "170.91M (170.9M)"
    assert rows["ViT"]["Depth"] == "9"
    text = (grid["out"] / "table.md").read_text()
    assert "Grid: `demo`" in text
    assert re.search(r"device cpu, threads 2; torch 2\.14\.1; timm 1\.0\.31; gmmvit 0\.1\.0", text)
    # a recipe key that differs by dataset is stated per dataset
    assert "for cifar10: limit_train=0" in text and "for digits: limit_train=64" in text

    columns, rows = md_rows(grid["out"] / "table_last.md")
    assert "CIFAR-10 (paper)" not in columns  # the paper reports the best epoch only
    last = [top1("digits", "swin", "gmm", s)[1] for s in (0, 1)]
    assert rows["GMM-Swin"]["Digits"].startswith(f"{sum(last) / 2:.2f} ± ")


def test_single_seed_shows_no_spread(tmp_path: Path) -> None:
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", mask, 0) for mask in ("none", "gmm")]
    report.report(metrics, tmp_path / "out", [write_measure(tmp_path / "m", "vit", k) for k in ("none", "gmm")])
    _, rows = md_rows(tmp_path / "out" / "table.md")
    assert rows["ViT"]["Digits"] == f"{top1('digits', 'vit', 'none', 0)[0]:.2f}"
    assert rows["GMM-ViT"]["Digits"] == f"{top1('digits', 'vit', 'gmm', 0)[0]:.2f} [+0.50]"


def test_plots_are_pngs(grid: dict) -> None:
    report.report([grid["runs"]], grid["out"], grid["measures"])
    for name in report.PLOTS:
        data = (grid["out"] / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_plots_without_baseline_or_paper_cells_are_still_written(tmp_path: Path) -> None:
    metrics = [write_cell(tmp_path / "runs", "digits", "vit", "gmm", 0)]
    report.report(metrics, tmp_path / "out", [])
    for name in report.PLOTS:
        assert (tmp_path / "out" / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    _, rows = md_rows(tmp_path / "out" / "table.md")
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
