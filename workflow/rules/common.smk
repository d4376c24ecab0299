# Config -> cells -> paths. Functions only (no rules), used by the rule files.

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from snakemake.utils import update_config


def typed_overrides(value: Any, depth: int = 0) -> Any:
    """`--config key={...}` parses nested values with YAML's BaseLoader, i.e. every leaf as a string:
    read nested string leaves as ordinary YAML so `--config 'recipes={demo: {epochs: 5}}'` means 5.
    Top-level values were already typed by Snakemake's own parsers, so they are left alone."""
    if isinstance(value, dict):
        return {k: typed_overrides(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [typed_overrides(v, depth + 1) for v in value]
    if isinstance(value, str) and depth > 1:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def retype_command_line_config(config: dict, workflow) -> None:
    update_config(config, typed_overrides(workflow.config_settings.overwrite_config or {}))


def check_config(config: dict) -> None:
    """What the JSON schema cannot say: names that refer to other entries exist."""
    grids, recipes, datasets = config["grids"], config["recipes"], config["datasets"]
    if config["grid"] not in grids:
        raise ValueError(f"config grid={config['grid']!r} is not defined; defined grids: {', '.join(grids)}")
    for name, grid in grids.items():
        if grid["recipe"] not in recipes:
            raise ValueError(
                f"config grids.{name}.recipe={grid['recipe']!r} is not defined; "
                f"defined recipes: {', '.join(recipes)}"
            )
        missing = [d for d in grid["datasets"] if d not in datasets]
        if missing:
            raise ValueError(
                f"config grids.{name}.datasets: {', '.join(missing)} not described under `datasets` "
                f"(num_classes, img_size); described: {', '.join(datasets)}"
            )


# ---------------------------------------------------------------- the grid's cells


class Cell(NamedTuple):
    recipe: str
    dataset: str
    model: str
    mask: str
    seed: int


def grid_cells() -> list[Cell]:
    grid = config["grids"][config["grid"]]
    return [
        Cell(grid["recipe"], dataset, model, mask, seed)
        for dataset in grid["datasets"]
        for model in grid["models"]
        for mask in grid["masks"]
        for seed in grid["seeds"]
    ]


def recipe_overrides(recipe: str, dataset: str) -> dict[str, Any]:
    """The recipe keys a cell overrides on its base recipe: the recipe's own, then its dataset's."""
    spec = config["recipes"][recipe]
    keys = {k: v for k, v in spec.items() if k not in ("base", "description", "per_dataset")}
    return keys | spec.get("per_dataset", {}).get(dataset, {})


def overrides_json(recipe: str, dataset: str) -> str:
    # Sorted keys: the same overrides always give the same string, so Snakemake's params trigger
    # reruns a cell exactly when its resolved overrides change.
    return json.dumps(recipe_overrides(recipe, dataset), sort_keys=True)


def dataset_root(dataset: str) -> str:
    return config["datasets"][dataset].get("path") or config["data_root"]


def image_size(recipe: str, dataset: str) -> int:
    return recipe_overrides(recipe, dataset).get("img_size") or config["datasets"][dataset]["img_size"]


# ---------------------------------------------------------------- paths
# Functions, not constants: this file is included before the config is validated.

PLOTS = ["accuracy", "mask_delta", "learning_curves", "vs_paper"]


def results(path: str) -> str:
    """A path (or pattern) under the configured results folder."""
    return str(Path(config["results"], path))


def cell_path(name: str) -> str:
    """Pattern of a cell's file: the cell's identity is its path."""
    return results(f"runs/{{recipe}}/{{dataset}}/{{model}}-{{mask}}/seed{{seed}}/{name}")


def cell_log() -> str:
    return results("logs/train/{recipe}/{dataset}/{model}-{mask}/seed{seed}.log")


def measure_path() -> str:
    return results("measure/{model}-{mask}-{img_size}px-{num_classes}c.json")


def grid_files(name: str) -> list[str]:
    return [cell_path(name).format(**cell._asdict()) for cell in grid_cells()]


def report_tables() -> list[str]:
    return [results(name) for name in ("table.md", "table_last.md", "table.csv")]


def report_plots() -> list[str]:
    return [results(f"plots/{name}.png") for name in PLOTS]


def prepared_marker(dataset: str) -> str | None:
    """The file `gmmvit prepare` writes last, once the data is complete; None: nothing to download."""
    info = config["datasets"][dataset]
    return str(Path(dataset_root(dataset), info["prepared"])) if info.get("prepared") else None


def prepared_markers() -> dict[str, str]:
    """Marker -> dataset, for every downloadable dataset of the config."""
    return {marker: name for name in config["datasets"] if (marker := prepared_marker(name))}


def measure_files() -> list[str]:
    """One per model x mask x (image size, classes) the grid uses, plus the paper's convention
    (32 px, 10 classes) that the table's Params and MACs columns report."""
    grid = config["grids"][config["grid"]]
    shapes = {(32, 10)} | {
        (image_size(grid["recipe"], d), config["datasets"][d]["num_classes"]) for d in grid["datasets"]
    }
    return [
        measure_path().format(model=model, mask=mask, img_size=size, num_classes=classes)
        for model in grid["models"]
        for mask in grid["masks"]
        for size, classes in sorted(shapes)
    ]


# ---------------------------------------------------------------- package source as job inputs


def src_files(*patterns: str) -> list[str]:
    """The package files a step depends on: editing one reruns that step's jobs (Snakemake tracks
    no imported module by itself)."""
    root = Path(config["src_dir"] or Path(workflow.basedir) / "src" / "gmmvit")
    files = []
    for pattern in patterns:
        found = sorted(str(p) for p in root.glob(pattern))
        if not found:
            raise ValueError(f"config src_dir: {root} has no {pattern} (is it the gmmvit package folder?)")
        files += found
    return files


def train_inputs(wildcards) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "code": src_files("models/*.py", "masks.py", "attention.py", "data.py", "recipe.py", "train.py")
    }
    marker = prepared_marker(wildcards.dataset)
    if marker:
        # ancient: preparing the data again (same files, new marker) must not retrain every cell
        inputs["data"] = ancient(marker)
    return inputs
