"""The real `snakemake` on a tiny grid in a temporary directory: the DAG, the table, incremental
rebuilds, config errors, a failing cell.

The workflow is the repository's (--snakefile); each test directory holds its own config.yaml and a
copy of the package source (config `src_dir`), so a test can edit "the code" without touching the
repository. Jobs still run the installed `gmmvit`. Most incremental checks are dry runs (-n).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import in_ci

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: snakemake, and gmmvit for the jobs
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
CELLS = [(d, k) for d in ("digits", "folder") for k in ("none", "gmm")]  # model vit, seed 0


# ---------------------------------------------------------------- helpers


def snakemake(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SNAKEMAKE_PROFILE", None)
    proc = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned(work: Path, *args: str) -> dict[str, list[str]]:
    """Rule -> first output of each job a dry run would run (rule all left out)."""
    out = snakemake(work, "--dry-run", *args)
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in (out.stdout + out.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"^\s+output: ([^,\s]+)", line)):
            jobs.setdefault(rule, []).append(m.group(1))
            rule = None
    return {rule: sorted(outputs) for rule, outputs in jobs.items()}


def markdown_table(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Columns and {row label: {column: cell}} of the markdown table in ``path``."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: dict(zip(cells[0], row)) for row in cells[2:]}


def metrics(dataset: str, mask: str, seed: int = 0) -> str:
    return f"results/runs/smoke/{dataset}/vit-{mask}/seed{seed}/metrics.json"


def tiny_config(work: Path) -> dict:
    """digits + a folder dataset the test writes, vit x {none, gmm}, seed 0, recipe smoke: 4 cells."""
    return {
        "grid": "tiny", "data_root": "data", "results": "results", "src_dir": str(work / "src" / "gmmvit"),
        "grids": {"tiny": {"datasets": ["digits", "folder"], "models": ["vit"], "masks": ["none", "gmm"],
                           "seeds": [0], "recipe": "smoke"}},
        "recipes": {"smoke": {"base": "smoke", "epochs": 1, "limit_train": 32, "limit_test": 32}},
        "datasets": {"digits": {"num_classes": 10, "img_size": 32},
                     "folder": {"num_classes": 2, "img_size": 32, "path": "folder"}},
        "resources": {rule: {"threads": 1, "mem_mb": 1000, "runtime": 10}
                      for rule in ("train", "measure", "prepare", "report")},
    }


def make_workdir(work: Path, config: dict | None = None) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "src" / "gmmvit", work / "src" / "gmmvit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "config.yaml").write_text(yaml.safe_dump(config or tiny_config(work), sort_keys=False))
    return work


def write_folder_dataset(root: Path) -> None:
    """Two classes of small PNGs: a dark and a bright one, so they are learnable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for label, level in (("dark", 40), ("bright", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


@contextmanager
def edited(path: Path, change: Callable[[str], str]) -> Iterator[None]:
    """Change a file for the duration of a test, then restore its content and mtime."""
    text, stat = path.read_text(), path.stat()
    path.write_text(change(text))
    os.utime(path, (time.time() + 5, time.time() + 5))  # newer than every output, even on a coarse clock
    try:
        yield
    finally:
        path.write_text(text)
        os.utime(path, (stat.st_atime, stat.st_mtime))


def with_config(mutate: Callable[[dict], None]) -> Callable[[str], str]:
    def change(text: str) -> str:
        config = yaml.safe_load(text)
        mutate(config)
        return yaml.safe_dump(config, sort_keys=False)
    return change


# ---------------------------------------------------------------- no build needed


def test_lint_is_clean(tmp_path: Path) -> None:
    out = snakemake(make_workdir(tmp_path), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_config_mirrors_the_package() -> None:
    """The schema's enums and config.yaml's dataset facts are what the package's registries say."""
    from dataclasses import fields

    from gmmvit import data, masks, models
    from gmmvit.recipe import BUILTIN_RECIPES, Recipe

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["$defs"]
    assert sorted(schema["model"]["enum"]) == sorted(models.model_names())
    assert sorted(schema["mask"]["enum"]) == sorted(masks.mask_names())
    assert sorted(schema["mask_with_kernels"]["enum"]) == sorted(masks.kernel_families())
    assert sorted(schema["dataset"]["enum"]) == sorted(data.dataset_names())
    recipe_keys = [f.name for f in fields(Recipe)]
    assert sorted(schema["recipe_keys"]["properties"]) == sorted(recipe_keys)
    assert sorted(schema["recipe"]["properties"]["base"]["enum"]) == sorted(BUILTIN_RECIPES)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    # every registered dataset, under its own name; beside them, named image folders (kind: folder)
    registered = {name: info for name, info in config["datasets"].items() if "kind" not in info}
    assert sorted(registered) == sorted(data.dataset_names())
    assert {info["kind"] for name, info in config["datasets"].items() if name not in registered} <= {"folder"}
    for name, info in registered.items():
        assert bool(info.get("prepared")) == data.needs_download(name), name
        if info.get("prepared"):
            assert Path("data", info["prepared"]) == data.marker_path(name, "data"), name


def test_conda_env_matches_pyproject() -> None:
    env = yaml.safe_load((REPO / "envs/gmmvit.yaml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and python.replace(" ", "") == "python=3.11"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["--editable ../.."]  # the package itself, with pyproject's dependencies


def _without_datasets(config: dict) -> None:
    del config["datasets"]


@pytest.mark.parametrize(
    ("args", "mutate", "expected"),
    [
        (["--config", "grids={tiny: {models: [vit, vitt]}}"], None,
         [r"'vitt' is not one of \['cait', 'pit', 'swin', 't2t', 'vit'\]", r"\['grids'\]\['tiny'\]\['models'\]"]),
        (["--config", "recipes={smoke: {epochs: five}}"], None,
         [r"'five' is not of type 'integer'", r"\['recipes'\]\['smoke'\]\['epochs'\]"]),
        (["--config", "recipes={smoke: {epoch: 2}}"], None,
         [r"'epoch' is not one of \[.*'epochs'.*\]", r"\['recipes'\]\['smoke'\]"]),
        ([], _without_datasets, [r"'datasets' is a required property"]),
        (["--config", "grid=nosuch"], None, [r"config grid='nosuch' is not defined; defined grids: tiny"]),
        (["--config", "grids={tiny: {recipe: nosuch}}"], None,
         [r"grids.tiny.recipe='nosuch' is not defined; defined recipes: smoke"]),
    ],
    ids=["unknown-model", "wrong-type", "unknown-recipe-key", "missing-key", "unknown-grid", "unknown-recipe"],
)
def test_bad_config_fails_before_any_job(tmp_path: Path, args: list[str], mutate, expected: list[str]) -> None:
    work = make_workdir(tmp_path)
    if mutate:
        (work / "config.yaml").write_text(with_config(mutate)((work / "config.yaml").read_text()))
    out = snakemake(work, *args, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    for pattern in expected:
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"
    assert "Job stats" not in text and not (work / "results").exists()


def test_paper_grid_dry_run_with_everything_built_does_nothing(tmp_path: Path) -> None:
    """The whole paper grid (180 cells) with every output present: nothing to do.

    Also the benchmark of the dry run's speed (a figure to report, not a timed assertion):
    pytest tests/test_workflow.py -k paper_grid -s"""
    config = yaml.safe_load((REPO / "config.yaml").read_text()) | {"src_dir": str(tmp_path / "src/gmmvit")}
    work = make_workdir(tmp_path, config)
    grid = config["grids"]["paper"]
    now = time.time()
    stages: list[list[str]] = [
        [f"data/{config['datasets'][d]['prepared']}" for d in grid["datasets"]],
        [f"results/runs/paper/{d}/{m}-{k}/seed{s}/{f}" for d in grid["datasets"] for m in grid["models"]
         for k in grid["masks"] for s in grid["seeds"] for f in ("metrics.json", "history.csv")]
        + [f"results/measure/{m}-{k}-{size}px-{classes}c.json" for m in grid["models"] for k in grid["masks"]
           for size, classes in ((32, 10), (32, 100), (64, 200))],
        [f"results/{name}"
         for name in ("table.md", "table_best.md", "table_last.md", "table.csv", "tables.html", "history.csv")]
        + [f"results/plots/{name}.png"
           for name in ("accuracy", "paired_difference", "learning_curves", "vs_paper")]
        + [f"results/plots/masks/{m}-{k}.png" for m in grid["models"] for k in grid["masks"] if k != "none"],
    ]
    for source in (work / "src").rglob("*"):
        os.utime(source, (now - 1000, now - 1000))
    for age, files in zip((300, 200, 100), stages):  # inputs older than what is made from them
        for file in files:
            (work / file).parent.mkdir(parents=True, exist_ok=True)
            (work / file).touch()
            os.utime(work / file, (now - age, now - age))
    start = time.perf_counter()
    out = snakemake(work, "--dry-run", "--config", "grid=paper")
    seconds = time.perf_counter() - start
    assert "Nothing to be done" in out.stdout + out.stderr
    print(f"\npaper grid dry run, everything built: {seconds:.2f} s")


# ---------------------------------------------------------------- the tiny grid, built once


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = make_workdir(tmp_path_factory.mktemp("tiny"))
    write_folder_dataset(work / "folder")
    snakemake(work)
    return work


def test_build_writes_every_cell_and_a_table_of_their_numbers(built: Path) -> None:
    table = pd.read_csv(built / "results/table.csv")
    assert len(table) == len(CELLS)
    columns, rows = markdown_table(built / "results/table.md")
    assert columns[:3] == ["Model", "Digits", "Folder"]  # no (paper) column: the paper has neither
    assert list(rows) == ["ViT", "GMM-ViT"]
    for dataset, mask in CELLS:
        record = json.loads((built / metrics(dataset, mask)).read_text())
        row = table[(table["dataset"] == dataset) & (table["mask"] == mask)]
        for key in ("model", "seed", "selected_top1", "selected_epoch", "best_top1", "best_epoch",
                    "last_top1", "params", "recipe", "selection", "learned", "source_hash"):
            assert row[key].item() == record[key], (dataset, mask, key)
        assert row["macs_all"].notna().item()  # its measure (10 or 2 classes) was found
        # the headline is the validation-selected epoch; one seed claims no difference
        assert record["selection"] == "val"
        shown = rows["ViT" if mask == "none" else "GMM-ViT"][dataset.capitalize()]
        flag = "" if record["learned"] else " ✗"
        assert shown == f"{record['selected_top1']:.2f}" + (" (n=1)" if record["learned"] else flag)
        assert "[" not in shown
        assert (built / metrics(dataset, mask)).with_name("history.csv").is_file()
    assert (built / "results/measure/vit-gmm-32px-2c.json").is_file()
    for plot in ("accuracy", "paired_difference", "learning_curves", "vs_paper", "masks/vit-gmm"):
        assert (built / f"results/plots/{plot}.png").stat().st_size > 0
    assert not (built / "results/plots/kernels.png").exists()  # no K variants in this grid


def test_second_run_does_nothing(built: Path) -> None:
    out = snakemake(built)
    assert "Nothing to be done" in out.stdout + out.stderr
    # the cluster profile parses and agrees (its executor is not used in a dry run)
    out = snakemake(built, "--dry-run", "--workflow-profile", str(REPO / "workflow/profiles/slurm"))
    assert "Nothing to be done" in out.stdout + out.stderr


def test_finished_cells_drop_their_checkpoints_and_keeping_them_reruns_nothing(built: Path) -> None:
    assert not list((built / "results/runs").rglob("checkpoint.pt"))
    assert len(list((built / "results/runs").rglob("mask_params.pt"))) == len(CELLS)
    out = snakemake(built, "--dry-run", "--config", "keep_checkpoints=True")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_recipe_change_for_one_dataset_plans_only_its_cells(built: Path) -> None:
    def longer_folder(config: dict) -> None:
        config["recipes"]["smoke"]["per_dataset"] = {"folder": {"epochs": 2}}

    with edited(built / "config.yaml", with_config(longer_folder)):
        jobs = planned(built)
    assert jobs == {"train": [metrics("folder", "gmm"), metrics("folder", "none")],
                    "report": ["results/table.md"]}
    # the same from the command line (nested --config values are read as YAML, so 2 is an integer)
    jobs = planned(built, "--config", "recipes={smoke: {per_dataset: {digits: {lr: 1.0e-4}}}}")
    assert jobs == {"train": [metrics("digits", "gmm"), metrics("digits", "none")],
                    "report": ["results/table.md"]}
    assert planned(built) == {}  # changing the config back needs nothing


def test_adding_a_seed_plans_only_the_new_cells(built: Path) -> None:
    jobs = planned(built, "--config", "grids={tiny: {seeds: [0, 1]}}")
    assert jobs == {"train": sorted(metrics(d, k, seed=1) for d, k in CELLS), "report": ["results/table.md"]}


@pytest.mark.parametrize(
    ("source", "rules"),
    [
        ("report/tables.py", {"report"}),
        ("reference/paper_table.csv", {"report"}),
        ("models/vit.py", {"train", "measure", "report"}),
        ("data/base.py", {"train", "report"}),  # every dataset kind imports it
        ("complexity.py", {"measure", "report"}),
    ],
)
def test_code_change_reruns_what_it_affects(built: Path, source: str, rules: set[str]) -> None:
    with edited(built / "src/gmmvit" / source, lambda text: text + "\n"):
        jobs = planned(built)
    assert set(jobs) == rules
    if "train" in rules:
        assert len(jobs["train"]) == len(CELLS)  # every cell, not some
    if "measure" in rules:
        assert len(jobs["measure"]) == 4  # vit x {none, gmm} x {10, 2 classes}


def test_recipe_change_retrains_exactly_that_dataset_from_scratch(built: Path) -> None:
    before = {cell: (built / metrics(*cell)).stat().st_mtime for cell in CELLS}
    config = built / "config.yaml"
    config.write_text(with_config(lambda c: c["recipes"]["smoke"].update(
        per_dataset={"folder": {"epochs": 2}}))(config.read_text()))
    snakemake(built)
    for dataset, mask in CELLS:
        changed = (built / metrics(dataset, mask)).stat().st_mtime != before[(dataset, mask)]
        assert changed == (dataset == "folder"), (dataset, mask)
    for mask in ("none", "gmm"):
        record = json.loads((built / metrics("folder", mask)).read_text())
        assert record["epochs"] == 2 and record["recipe_config"]["epochs"] == 2
        log = (built / f"results/logs/train/smoke/folder/vit-{mask}/seed0.log").read_text()
        # a changed recipe is a new run: continuing the old run's checkpoint would mix two recipes
        assert "resuming" not in log, log
        assert len(pd.read_csv((built / metrics("folder", mask)).with_name("history.csv"))) == 2
    table = pd.read_csv(built / "results/table.csv")  # and the report followed
    assert table.groupby("dataset")["epochs"].max().to_dict() == {"digits": 1, "folder": 2}


def test_failing_cell_names_its_log_and_the_rest_still_builds(built: Path) -> None:
    # lr 1e30 without warm-up: the second step's loss is not finite and training stops (exit != 0)
    out = snakemake(built, "--keep-going", "--config", "grids={tiny: {seeds: [0, 1]}}",
                    "recipes={smoke: {per_dataset: {folder: {lr: 1.0e+30, warmup_epochs: 0, epochs: 2}}}}",
                    check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    for mask in ("none", "gmm"):
        assert f"results/logs/train/smoke/folder/vit-{mask}/seed1.log" in text
        assert "diverged" in (built / f"results/logs/train/smoke/folder/vit-{mask}/seed1.log").read_text()
        assert not (built / metrics("folder", mask, seed=1)).exists()  # a failed run leaves no record
        assert (built / metrics("digits", mask, seed=1)).is_file()  # --keep-going built the others


# ---------------------------------------------------------------- image folders of your own, by name


def two_folders_config(work: Path) -> dict:
    """The tiny grid over two named image folders, decoded at different sizes."""
    config = tiny_config(work)
    config["grids"]["tiny"]["datasets"] = ["flowers", "insects"]
    config["recipes"]["smoke"]["per_dataset"] = {"insects": {"epochs": 2}}
    config["datasets"] |= {
        "flowers": {"kind": "folder", "path": "flowers", "num_classes": 2, "img_size": 40},
        "insects": {"kind": "folder", "path": str(work / "my insects"), "num_classes": 2, "img_size": 24},
    }
    return config


def test_named_folder_datasets_reach_training_at_their_img_size(tmp_path: Path) -> None:
    work = make_workdir(tmp_path, two_folders_config(tmp_path))
    for folder in ("flowers", "my insects"):
        write_folder_dataset(work / folder)
    out = snakemake(work, "--dry-run", "--printshellcmds")
    text = out.stdout + out.stderr
    for name, path, size in (("flowers", "flowers", 40), ("insects", f"'{work / 'my insects'}'", 24)):
        for mask in ("none", "gmm"):
            command = next(line for line in text.splitlines()
                           if f"gmmvit train --dataset {name} --model vit --mask {mask} " in line)
            assert f" --dataset-kind folder --dataset-path {path} --img-size {size} " in command
        assert f"results/measure/vit-gmm-{size}px-2c.json" in text  # the measured model's size too
    assert "--overrides '{\"epochs\": 2, " in text  # per_dataset takes a folder's name


@pytest.mark.parametrize("breakage", ["num-classes", "no-folder", "unregistered-name"])
def test_folder_dataset_mismatch_fails_before_any_job(tmp_path: Path, breakage: str) -> None:
    config = two_folders_config(tmp_path)
    flowers = tmp_path / "flowers"
    if breakage == "num-classes":
        config["datasets"]["flowers"]["num_classes"] = 5
        expected = [f"config datasets.flowers.num_classes is 5, but {flowers / 'train'} has 2 class folders"]
    elif breakage == "no-folder":
        config["datasets"]["flowers"]["path"] = "nowhere"
        expected = [f"config datasets.flowers.path: {tmp_path / 'nowhere'} does not exist"]
    else:
        del config["datasets"]["flowers"]["kind"]
        expected = ["config datasets.flowers: not a registered dataset", "kind: folder and path"]
    work = make_workdir(tmp_path, config)
    for folder in ("flowers", "my insects"):
        write_folder_dataset(work / folder)
    out = snakemake(work, "--dry-run", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    for message in expected:
        assert message in text, text
    assert "Job stats" not in text and not (work / "results").exists()


@pytest.fixture(scope="module")
def html_report(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`snakemake --report`, built on every machine (only its rendering needs a browser)."""
    report = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(built, "--report", str(report))
    return report


def test_html_report_holds_its_description_captions_tables_and_figures(built: Path, html_report: Path) -> None:
    """What the report file carries, read without a browser: the description page, a caption per
    table and plot, the tables with the cells' numbers, the figures embedded."""
    page = html_report.read_text()
    text = re.sub(r"<[^>]+>", "", page)  # rendered markup (bold, code) removed
    # every caption of what this grid has (no K variants: no kernels plot), by its opening words
    for caption in sorted((REPO / "workflow" / "report").glob("*.rst")):
        if caption.stem == "kernels":
            continue
        first = next(line for line in caption.read_text().splitlines() if line.strip() and "{" not in line)
        plain = re.sub(r"\*+|`+", "", first).strip()[:40]
        assert plain in text, caption.name
    # the three tables page travels inside the file as a base64 data URI: the headline number in it
    embedded = re.search(r"data:text/html[^,]*;base64,([A-Za-z0-9+/=]+)", page)
    assert embedded, "the tables page is not embedded"
    tables = base64.b64decode(embedded.group(1)).decode()
    record = json.loads((built / metrics("digits", "none")).read_text())
    assert "<table" in tables and f"{record['selected_top1']:.2f}" in tables
    for plot in ("accuracy", "paired_difference", "learning_curves", "vs_paper", "vit-gmm"):
        assert f"{plot}.png" in page
    assert page.count("iVBORw0KGgo") >= 5  # the PNGs themselves, inside the file (base64)
    assert '"What the masks learned"' in page


def test_html_report_reads_as_a_reader_sees_it_in_chromium(built: Path, html_report: Path,
                                                           tmp_path: Path) -> None:
    """`snakemake --report` opened in headless Chromium: a page that says what the benchmark is,
    the tables inline with the cells' numbers, every plot drawn, and no script errors."""
    import browser

    if reason := browser.missing():
        if in_ci():
            pytest.fail(f"CI must open the HTML report: {reason}")
        pytest.skip(reason)
    report = html_report
    seen = browser.look(report, screenshot=tmp_path / "report.png")
    assert "locality masks" in seen.home_text and "did not learn" in seen.home_text
    assert not seen.errors, seen.errors
    header, *rows = seen.table_cells
    assert header[:3] == ["Model", "Digits", "Folder"]
    record = json.loads((built / metrics("digits", "none")).read_text())
    assert rows[0][0] == "ViT" and rows[0][1].startswith(f"{record['selected_top1']:.2f}")
    assert set(seen.plots) == {"accuracy", "paired_difference", "learning_curves", "vs_paper"}
    # the mask figure is in the report, under its own category (a JSON key of the page's data)
    page = report.read_text()
    assert '"What the masks learned"' in page and "vit-gmm.png" in page
    assert all(width > 100 and shown for width, shown in seen.plots.values()), seen.plots
    assert (tmp_path / "report.png").stat().st_size > 10_000
