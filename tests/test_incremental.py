"""A cell's code inputs are the code it runs: adding a model or a mask family retrains nothing that
exists, and editing a module reruns exactly the cells that import it.

Real `snakemake --dry-run` on a grid whose outputs are touched into place (no training): with no
Snakemake metadata, only modification times decide, which is what a code edit changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import REPO, edited, make_workdir, planned, snakemake

from gmmvit.registry import DATASET_MODULES

pytestmark = pytest.mark.slow

MODELS = ["vit", "swin", "t2t"]  # t2t imports vit's block: a dependency between model modules
MASKS = ["none", "gmm", "gmm-k3", "gmm_add", "gmm_official", "elm", "rmt", "lsa"]


def incremental_config(work: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["grids"]["inc"] = {"datasets": ["digits"], "models": MODELS, "masks": MASKS, "seeds": [0],
                              "recipe": "demo"}
    return config | {"grid": "inc", "src_dir": str(work / "src" / "gmmvit")}


def train_output(model: str, mask: str, dataset: str = "digits") -> str:
    return f"results/runs/demo/{dataset}/{model}-{mask}/seed0/metrics.json"


def measure_output(model: str, mask: str) -> str:
    return f"results/measure/{model}-{mask}-32px-10c.json"


@pytest.fixture(scope="module")
def touched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every train and measure output of the grid present and newer than the code. The report's
    outputs are left out (it reruns whenever a cell does; the tests look at train and measure)."""
    work = tmp_path_factory.mktemp("incremental")
    make_workdir(work, incremental_config(work))
    now = time.time()
    for source in (work / "src").rglob("*"):
        os.utime(source, (now - 1000, now - 1000))
    for model in MODELS:
        for mask in MASKS:
            cell = train_output(model, mask)
            for output in (cell, cell.replace("metrics.json", "history.csv"),
                           cell.replace("metrics.json", "mask_params.pt"), measure_output(model, mask)):
                (work / output).parent.mkdir(parents=True, exist_ok=True)
                (work / output).touch()
                os.utime(work / output, (now - 100, now - 100))
    return work


def cell_jobs(work: Path) -> dict[str, list[str]]:
    jobs = planned(work)
    return {rule: jobs.get(rule, []) for rule in ("train", "measure")}


def expected(cells: list[tuple[str, str]]) -> dict[str, list[str]]:
    return {"train": sorted(train_output(*c) for c in cells), "measure": sorted(measure_output(*c) for c in cells)}


def test_nothing_to_do_when_everything_is_built(touched: Path) -> None:
    assert cell_jobs(touched) == {"train": [], "measure": []}


NEW_FAMILY = '''"""A family added after the grid was built."""

from torch import Tensor

from .base import LocalityMask, register_mask, squared_distances


@register_mask("newfamily")
class NewFamilyMask(LocalityMask):
    combine = "add"

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        self.register_buffer("bias", -squared_distances(grid)[None], persistent=False)

    def forward(self) -> Tensor:
        return self.bias
'''

NEW_MODEL = '''"""A model added after the grid was built: the ViT builder under another name."""

from . import register_model
from .vit import vit


@register_model("newmodel")
def newmodel(mask_factory, **kwargs):
    return vit(mask_factory, **kwargs)
'''


def test_adding_a_mask_family_or_a_model_plans_nothing_for_existing_cells(touched: Path) -> None:
    package = touched / "src" / "gmmvit"
    added = [package / "masks" / "newfamily.py", package / "models" / "newmodel.py"]
    try:
        added[0].write_text(NEW_FAMILY)
        added[1].write_text(NEW_MODEL)
        assert cell_jobs(touched) == {"train": [], "measure": []}
    finally:
        for file in added:
            file.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("source", "cells"),
    [
        # gmm_add and gmm_official subclass GMM: they run gmm.py too
        ("masks/gmm.py", [(m, k) for m in MODELS for k in ("gmm", "gmm-k3", "gmm_add", "gmm_official")]),
        ("masks/gmm_official.py", [(m, "gmm_official") for m in MODELS]),
        ("masks/temperature.py", [(m, "lsa") for m in MODELS]),  # lsa is temperature + blocking
        ("masks/elm.py", [(m, "elm") for m in MODELS]),
        ("models/swin.py", [("swin", k) for k in MASKS]),
        ("models/vit.py", [(m, k) for m in ("vit", "t2t") for k in MASKS]),  # t2t imports vit's block
        ("masks/base.py", [(m, k) for m in MODELS for k in MASKS]),  # every cell imports the registry
        ("attention.py", [(m, k) for m in MODELS for k in MASKS]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_editing_a_module_reruns_exactly_the_cells_that_run_it(touched: Path, source: str, cells) -> None:
    with edited(touched / "src" / "gmmvit" / source, lambda text: text + "\n# edited\n"):
        assert cell_jobs(touched) == expected(cells)
    assert cell_jobs(touched) == {"train": [], "measure": []}


def test_train_inputs_hold_exactly_the_package_modules_training_loads(tmp_path: Path) -> None:
    """Compared with what Python really imports: the train module, the model and its mask."""
    work = make_workdir(tmp_path, incremental_config(tmp_path))
    out = snakemake(work, "--dry-run", "--config", "grids={inc: {models: [t2t, swin], masks: [lsa, gmm-k3]}}")
    inputs: dict[str, set[str]] = {}  # a train job's metrics.json -> its input files
    rule, code = None, set()
    for line in (out.stdout + out.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif rule == "train" and (m := re.match(r"^\s+input: (.*)$", line)):
            code = set(m.group(1).split(", "))
        elif rule == "train" and (m := re.match(r"^\s+output: ([^,\s]+)", line)):
            inputs[m.group(1)], rule = code, None
    assert len(inputs) == 4
    package = work / "src" / "gmmvit"
    for model in ("t2t", "swin"):
        for mask in ("lsa", "gmm-k3"):
            load = ("import json, sys, gmmvit.train; from gmmvit.models import build_model; "
                    f"build_model({model!r}, mask={mask!r}); gmmvit.train.load_dataset('digits'); "
                    "print(json.dumps([m.__file__ for n, m in sys.modules.items() if n.startswith('gmmvit')]))")
            run = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True,
                                 env=os.environ | {"PYTHONPATH": str(work / "src")})
            loaded = set(json.loads(run.stdout))
            assert all(path.startswith(str(package)) for path in loaded)  # the copy, not the repository
            code = inputs[train_output(model, mask)]
            assert loaded <= code, sorted(loaded - code)
            assert per_cell_modules(code) == per_cell_modules(loaded)  # no other model, family or kind
            assert any(path.endswith("/data/digits.py") for path in per_cell_modules(code))


def per_cell_modules(paths: set[str]) -> set[str]:
    """The model, mask-family and dataset-kind modules among ``paths`` (not the registries or shared
    helpers)."""
    kinds = "|".join(sorted(set(DATASET_MODULES.values())))
    return {p for p in paths
            if re.search(rf"/(models|masks)/(?!__init__|base|common)\w+\.py$|/data/({kinds})\.py$", p)}


# ---------------------------------------------------------------- one dataset kind's code

DATA_DATASETS, DATA_MASKS = ["digits", "svhn"], ["none", "gmm"]


@pytest.fixture(scope="module")
def touched_two_kinds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grid of digits and SVHN cells (vit x none, gmm), every train and measure output present and
    newer than the code, and SVHN's prepared marker in place (so no prepare job is planned)."""
    work = tmp_path_factory.mktemp("incremental-data")
    config = incremental_config(work)
    config["grids"]["inc"] |= {"datasets": DATA_DATASETS, "models": ["vit"], "masks": DATA_MASKS}
    make_workdir(work, config)
    now = time.time()
    for source in (work / "src").rglob("*"):
        os.utime(source, (now - 1000, now - 1000))
    outputs = [work / "data" / config["datasets"]["svhn"]["prepared"]]
    for dataset in DATA_DATASETS:
        for mask in DATA_MASKS:
            cell = train_output("vit", mask, dataset)
            outputs += [work / cell, work / cell.replace("metrics.json", "history.csv"),
                        work / cell.replace("metrics.json", "mask_params.pt"),
                        work / measure_output("vit", mask)]
    for output in outputs:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
        os.utime(output, (now - 100, now - 100))
    assert cell_jobs(work) == {"train": [], "measure": []}
    return work


@pytest.mark.parametrize(
    ("source", "datasets"),
    [
        ("data/svhn.py", ["svhn"]),  # another kind's reader: no digits cell
        ("data/digits.py", ["digits"]),
        ("data/cifar.py", []),  # a kind the grid does not read
        ("data/prepare.py", []),  # only `gmmvit prepare` runs it
        ("data/cache.py", ["svhn"]),  # shared by the kinds read from disk, not imported by digits
        ("data/download.py", ["svhn"]),
        ("data/base.py", ["digits", "svhn"]),  # shared by every kind
        ("data/__init__.py", ["digits", "svhn"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_editing_a_data_module_retrains_exactly_the_cells_of_the_kinds_that_run_it(
        touched_two_kinds: Path, source: str, datasets: list[str]) -> None:
    with edited(touched_two_kinds / "src" / "gmmvit" / source, lambda text: text + "\n# edited\n"):
        jobs = cell_jobs(touched_two_kinds)
    assert jobs == {"train": sorted(train_output("vit", mask, d) for d in datasets for mask in DATA_MASKS),
                    "measure": []}  # measuring reads no dataset
    assert cell_jobs(touched_two_kinds) == {"train": [], "measure": []}


@pytest.mark.parametrize(
    ("masks", "expected"),
    [
        ("[none, gmmm]", r"config grids.inc.masks: 'gmmm' is not a mask; valid masks: none, alibi2d, elm, gmm, "
                         r"gmm_add, gmm_official, gpsa, lsa, rmt, temperature, or <family>-k<K> with K >= 1 for gmm, "
                         r"gmm_add, gmm_official"),
        ("[none, elm-k3]", r"config grids.inc.masks: 'elm-k3' is not a mask; valid masks: none, alibi2d"),
        ("[none, gmm-x3]", r"'gmm-x3' does not match"),
    ],
    ids=["unknown-family", "k-on-a-family-without-k", "bad-syntax"],
)
def test_unknown_mask_spec_fails_before_any_job(tmp_path: Path, masks: str, expected: str) -> None:
    work = make_workdir(tmp_path, incremental_config(tmp_path))
    out = snakemake(work, "--dry-run", "--config", f"grids={{inc: {{masks: {masks}}}}}", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and re.search(expected, text), text
    assert "Job stats" not in text
