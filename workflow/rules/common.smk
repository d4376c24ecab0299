# Config -> cells -> paths. Functions only (no rules), used by the rule files.

import importlib.util
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
    check_datasets(config)
    check_mask_specs(config)


# ---------------------------------------------------------------- datasets


def registered_datasets() -> list[str]:
    """The package's dataset names, read from the schema (a test keeps the two equal), so parsing
    the workflow imports no torch."""
    schema = Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
    return yaml.safe_load(schema.read_text())["$defs"]["dataset"]["enum"]


def kind_of(name: str, info: dict) -> str:
    """The registered dataset an entry reads: its `kind`, else its own name."""
    return info.get("kind", name)


def check_datasets(config: dict) -> None:
    """Entries name what they read; the selected grid's image folders match their entries."""
    registered, datasets = registered_datasets(), config["datasets"]
    for name, info in datasets.items():
        if kind_of(name, info) not in registered:
            raise ValueError(
                f"config datasets.{name}: not a registered dataset ({', '.join(registered)}); for a "
                "folder of your own images add kind: folder and path: <its train/ + val/ tree>"
            )
        if "kind" in info and name in registered and name != info["kind"]:
            raise ValueError(f"config datasets.{name}: {name} is a registered dataset; give this "
                             f"{info['kind']} another name")
        if kind_of(name, info) == "folder" and info.get("prepared"):
            raise ValueError(f"config datasets.{name}: a folder is read in place and has nothing to "
                             "prepare; remove `prepared`")
    for recipe_name, recipe in config["recipes"].items():
        unknown = [d for d in recipe.get("per_dataset", {}) if d not in datasets]
        if unknown:
            raise ValueError(f"config recipes.{recipe_name}.per_dataset: {', '.join(unknown)} not "
                             f"described under `datasets`; described: {', '.join(datasets)}")
    # The data is part of the environment, which `snakemake --lint` does not check (it turns off
    # the check of the workflow's own `envvars` too): linting needs no dataset.
    if not getattr(workflow, "check_envvars", True):
        return
    for name in config["grids"][config["grid"]]["datasets"]:
        info = datasets[name]
        if kind_of(name, info) == "folder":
            check_folder(name, info, Path(info.get("path") or config["data_root"]))


def check_folder(name: str, info: dict, path: Path) -> None:
    """A missing folder or a wrong class count fails now rather than in every training job (a
    wrong num_classes would otherwise size the measured models' heads wrongly)."""
    shown = path.resolve()
    if not path.is_dir():
        raise ValueError(f"config datasets.{name}.path: {shown} does not exist or is not a folder; it "
                         "must hold train/<class>/<images> and val/<class>/<images> (or test/)")
    train = path / "train"
    if not train.is_dir():
        raise ValueError(f"config datasets.{name}.path: {shown} has no train/ folder; it must hold "
                         "train/<class>/<images> and val/<class>/<images> (or test/)")
    # As gmmvit.data (decode.py) counts classes: the subfolders of train/ that are not hidden.
    classes = sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes != info["num_classes"]:
        raise ValueError(
            f"config datasets.{name}.num_classes is {info['num_classes']}, but {shown / 'train'} "
            f"has {classes} class folders: set num_classes: {classes}, or point path at the "
            "intended folder"
        )


# ---------------------------------------------------------------- masks

# gmmvit.masks.base's spec grammar: <family> or <family>-k<K> (K Gaussians, K >= 1).
MASK_SPEC = re.compile(r"(?P<family>[a-z0-9_]+)(?:-k(?P<kernels>[1-9][0-9]*))?")


def schema_defs() -> dict:
    schema = Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
    return yaml.safe_load(schema.read_text())["$defs"]


def check_mask_specs(config: dict) -> None:
    """Every grid's masks are specs of registered families (read from the schema, which a test keeps
    equal to gmmvit.masks' registry), a K only where the family has one."""
    defs = schema_defs()
    families, with_kernels = defs["mask"]["enum"], defs["mask_with_kernels"]["enum"]
    for name, grid in config["grids"].items():
        for spec in grid["masks"]:
            match = MASK_SPEC.fullmatch(spec)
            if not (match and match["family"] in families
                    and (match["kernels"] is None or match["family"] in with_kernels)):
                raise ValueError(
                    f"config grids.{name}.masks: {spec!r} is not a mask; valid masks: "
                    f"{', '.join(families)}, or <family>-k<K> with K >= 1 for "
                    f"{', '.join(with_kernels)} (e.g. {with_kernels[0]}-k3)"
                )


def mask_family(spec: str) -> str:
    return MASK_SPEC.fullmatch(spec)["family"]


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
    return registry.recipe_keys(config["recipes"][recipe], dataset)  # as `gmmvit train --recipes` reads it


def overrides_json(recipe: str, dataset: str) -> str:
    # Sorted keys: the same overrides always give the same string, so Snakemake's params trigger
    # reruns a cell exactly when its resolved overrides change.
    return json.dumps(recipe_overrides(recipe, dataset), sort_keys=True)


def dataset_root(dataset: str) -> str:
    return config["datasets"][dataset].get("path") or config["data_root"]


def dataset_arguments(dataset: str) -> list[str]:
    """`gmmvit train`'s options for a cell's data. A folder is decoded at the config's img_size; a
    registered dataset gets its data root only, so config values it does not read (its img_size)
    are not params, and changing them retrains nothing."""
    info = config["datasets"][dataset]
    if kind_of(dataset, info) != "folder":
        return ["--data-root", dataset_root(dataset)]
    return ["--dataset-kind", "folder", "--dataset-path", dataset_root(dataset),
            "--img-size", str(info["img_size"])]


def image_size(recipe: str, dataset: str) -> int:
    return recipe_overrides(recipe, dataset).get("img_size") or config["datasets"][dataset]["img_size"]


# ---------------------------------------------------------------- paths
# Functions, not constants: this file is included before the config is validated.

PLOTS = ["accuracy", "paired_difference", "learning_curves", "vs_paper"]  # gmmvit.report.PLOTS
KERNELS_PLOT = "kernels"  # gmmvit.report.KERNELS_PLOT: accuracy against K, for grids with K variants


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
    """The headline (selected epoch), the best test epoch (the paper's), the last epoch, the tidy CSV,
    the three tables as one HTML page (what the HTML report shows inline), and every cell's epochs
    (history.csv: what `gmmvit verify` compares with)."""
    names = ("table.md", "table_best.md", "table_last.md", "table.csv", "tables.html", "history.csv")
    return [results(name) for name in names]


def has_kernel_variants() -> bool:
    """Whether the grid lists a K variant (gmm-k3): gmmvit.report.has_kernel_variants asks the same
    of the cells, so the report writes kernels.png exactly when it is listed here."""
    return any(MASK_SPEC.fullmatch(spec)["kernels"] for spec in config["grids"][config["grid"]]["masks"])


def report_plots() -> list[str]:
    """The plots of every grid, and accuracy against K for a grid with K variants."""
    names = PLOTS + ([KERNELS_PLOT] if has_kernel_variants() else [])
    return [results(f"plots/{name}.png") for name in names]


def mask_figures() -> dict[tuple[str, str], str]:
    """(model, mask spec) -> the figure of what that masked model learned (gmmvit.report draws one
    per model x masked spec of the cells, from seed 0's saved mask parameters)."""
    grid = config["grids"][config["grid"]]
    return {(model, mask): results(f"plots/masks/{model}-{mask}.png")
            for model in grid["models"] for mask in grid["masks"] if mask != "none"}


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


# A job's code inputs are the package files it runs: its step's module, its model's, its mask
# family's and (training) its dataset kind's modules (one module each, found by name), and what those
# import from the package, read from their import statements (ast: parsing the workflow imports no
# torch). Editing a file reruns exactly the jobs that run it (the SVHN reader: the svhn cells only);
# adding a model, a mask family or a dataset (a new module) reruns nothing.


def src_root() -> Path:
    return Path(config["src_dir"] or Path(workflow.basedir) / "src" / "gmmvit")


def src_files(*patterns: str) -> list[str]:
    """The package files a step depends on: editing one reruns that step's jobs (Snakemake tracks
    no imported module by itself)."""
    root = src_root()
    files = []
    for pattern in patterns:
        found = sorted(str(p) for p in root.glob(pattern))
        if not found:
            raise ValueError(f"config src_dir: {root} has no {pattern} (is it the gmmvit package folder?)")
        files += found
    return files


def train_resources() -> dict[str, Any]:
    """resources.train, or resources.train_gpu with `train_on: gpu` (the paper grid on GPUs)."""
    if config.get("train_on", "cpu") == "gpu":
        if "train_gpu" not in config["resources"]:
            raise ValueError("config train_on=gpu needs resources.train_gpu (threads, mem_mb, runtime, gpu)")
        return config["resources"]["train_gpu"]
    return config["resources"]["train"]


def device_slots_argument() -> str:
    """`gmmvit train --device-slots`: where a local GPU job claims its (device, k) slot; "none" for
    CPU jobs. Under SLURM the job skips the claim (SLURM hands out the devices)."""
    return results("device-slots") if train_resources().get("gpu", 0) > 0 else "none"


def load_registry():
    """The package's gmmvit/registry.py, loaded by its path: it needs only the standard library, so
    parsing the workflow needs neither torch nor the package installed in snakemake's Python (with
    --software-deployment-method conda, only the jobs' environment has it)."""
    path = Path(workflow.basedir) / "src" / "gmmvit" / "registry.py"
    spec = importlib.util.spec_from_file_location("gmmvit_registry_of_the_workflow", path)
    loaded = importlib.util.module_from_spec(spec)  # not "module": a Snakemake keyword
    spec.loader.exec_module(loaded)
    return loaded


registry = load_registry()


def cell_code(step: str, model: str, mask: str, dataset_kind: str | None) -> list[str]:
    """The code a cell's job runs: its step's module (train.py, complexity.py), its model's module,
    its mask family's module and its dataset kind's module (None: measuring reads no dataset), with
    what they import; no other model's, family's or kind's (the same files whose hash `gmmvit train`
    records)."""
    try:
        return registry.code_files(*registry.cell_modules(step, model, mask_family(mask), dataset_kind),
                                   root=src_root())
    except ValueError as error:
        raise ValueError(f"config src_dir: {error}") from None


def train_inputs(wildcards) -> dict[str, Any]:
    kind = kind_of(wildcards.dataset, config["datasets"][wildcards.dataset])
    inputs: dict[str, Any] = {"code": cell_code("train.py", wildcards.model, wildcards.mask, kind)}
    marker = prepared_marker(wildcards.dataset)
    if marker:
        # ancient: preparing the data again (same files, new marker) must not retrain every cell
        inputs["data"] = ancient(marker)
    return inputs
