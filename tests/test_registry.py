"""The package read from its files (gmmvit.registry): the registries' names without torch, and the
code each cell runs, whose hash every record carries."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from gmmvit import registry
from gmmvit.train import source_hash

ROOT = registry.PACKAGE_ROOT


def relative(files: list[str], root: Path = ROOT) -> set[str]:
    return {str(Path(f).relative_to(root)) for f in files}


def test_names_come_without_importing_torch() -> None:
    code = ("import sys; from gmmvit import registry; "
            "print(registry.model_names(), registry.mask_names(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == (f"{registry.model_names()} {registry.mask_names()} False")
    assert registry.model_names() == ["cait", "pit", "swin", "t2t", "vit"]
    assert registry.mask_names()[0] == "none" and {"gmm", "elm", "rmt"} <= set(registry.mask_names())
    assert "base" not in registry.mask_names() and "common" not in registry.model_names()


def cell_code(model: str, mask: str, kind: str | None, step: str = "train.py",
              root: Path = ROOT) -> list[str]:
    return registry.code_files(*registry.cell_modules(step, model, mask, kind), root=root)


def test_a_cell_runs_its_own_model_and_family_and_what_they_import() -> None:
    vit_gmm = relative(cell_code("vit", "gmm", "digits"))
    assert {"train.py", "attention.py", "models/vit.py", "masks/gmm.py", "masks/base.py"} <= vit_gmm
    assert not vit_gmm & {"models/swin.py", "models/pit.py", "masks/elm.py", "report/__init__.py"}
    vit_none = relative(cell_code("vit", "none", "digits"))
    assert "masks/gmm.py" not in vit_none and vit_none < vit_gmm
    # t2t builds on vit's blocks: editing vit.py must reach it
    assert "models/vit.py" in relative(cell_code("t2t", "none", "digits"))


KIND_MODULES = {"data/digits.py", "data/cifar.py", "data/svhn.py", "data/tinyimagenet.py", "data/folder.py"}


def data_files(files: list[str]) -> set[str]:
    return {f for f in relative(files) if f.startswith("data/")}


def test_a_cell_runs_its_own_dataset_kind_and_the_shared_data_modules_it_imports() -> None:
    digits = data_files(cell_code("vit", "gmm", "digits"))
    assert digits == {"data/__init__.py", "data/base.py", "data/digits.py"}
    svhn = data_files(cell_code("vit", "gmm", "svhn"))
    assert svhn == {"data/__init__.py", "data/base.py", "data/svhn.py",
                    "data/cache.py", "data/lock.py", "data/download.py", "data/progress.py"}
    folder = data_files(cell_code("vit", "gmm", "folder"))
    assert folder & KIND_MODULES == {"data/folder.py"} and {"data/decode.py", "data/cache.py"} <= folder
    assert "data/download.py" not in folder  # a folder is read in place
    tiny = data_files(cell_code("vit", "gmm", "tinyimagenet"))
    assert tiny & KIND_MODULES == {"data/tinyimagenet.py"} and {"data/decode.py", "data/download.py"} <= tiny
    assert cell_code("vit", "gmm", "cifar10") == cell_code("vit", "gmm", "cifar100")  # one reader
    # only `gmmvit prepare` runs the preparation; measuring reads no dataset at all
    for kind in registry.DATASET_MODULES:
        assert "data/prepare.py" not in data_files(cell_code("vit", "gmm", kind)), kind
    assert data_files(cell_code("vit", "gmm", None, step="complexity.py")) & KIND_MODULES == set()


def test_the_dataset_map_matches_the_data_package() -> None:
    shared = {"__init__", "base", "cache", "decode", "download", "lock", "prepare", "progress"}
    modules = {p.stem for p in (ROOT / "data").glob("*.py")}
    assert modules - shared == set(registry.DATASET_MODULES.values())
    assert list(registry.DATASET_MODULES)[0] == "digits"  # the offline default first
    assert registry.dataset_module("cifar100") == "data/cifar.py"
    try:
        registry.cell_modules("train.py", "vit", "none", "imagenet1k")
    except ValueError as error:
        assert "unknown dataset kind 'imagenet1k'; known: digits, cifar10" in str(error)
    else:
        raise AssertionError("an unknown dataset kind was accepted")


def test_the_recorded_hash_moves_with_the_code_a_cell_runs_only(tmp_path: Path) -> None:
    copy = tmp_path / "gmmvit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def hashes() -> dict[tuple[str, str], str]:
        return {(model, mask): registry.code_hash(cell_code(model, mask, "digits", root=copy), root=copy)
                for model in ("vit", "swin") for mask in ("none", "gmm", "elm")}

    before = hashes()
    assert len(set(before.values())) == 6  # each model x mask runs different code
    # the copy hashes as the installed package does (paths are relative)
    assert before[("vit", "gmm")] == source_hash("vit", "gmm", "digits")
    gmm = copy / "masks" / "gmm.py"
    gmm.write_text(gmm.read_text() + "\n# an edit\n")
    (copy / "masks" / "newprior.py").write_text("# a new family: no existing cell runs it\n")
    after = hashes()
    changed = {cell for cell in before if before[cell] != after[cell]}
    assert changed == {("vit", "gmm"), ("swin", "gmm")}


def test_the_recorded_hash_moves_with_the_dataset_code_a_cell_runs_only(tmp_path: Path) -> None:
    copy = tmp_path / "gmmvit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    kinds = list(registry.DATASET_MODULES)

    def hashes() -> dict[str, str]:
        return {kind: registry.code_hash(cell_code("vit", "gmm", kind, root=copy), root=copy)
                for kind in kinds}

    def edited(module: str) -> set[str]:
        before = hashes()
        (copy / module).write_text((copy / module).read_text() + "\n# an edit\n")
        after = hashes()
        return {kind for kind in kinds if before[kind] != after[kind]}

    assert len(set(hashes().values())) == len(kinds) - 1  # cifar10 and cifar100 share their reader
    assert edited("data/svhn.py") == {"svhn"}
    assert edited("data/cifar.py") == {"cifar10", "cifar100"}
    assert edited("data/decode.py") == {"tinyimagenet", "folder"}
    assert edited("data/download.py") == {"cifar10", "cifar100", "svhn", "tinyimagenet"}
    assert edited("data/prepare.py") == set()
    assert edited("data/base.py") == set(kinds)


def test_the_workflow_parses_without_the_package_importable() -> None:
    """With --software-deployment-method conda only the jobs' environment has gmmvit: snakemake's own
    Python must plan the grid without it (the workflow loads registry.py by its path)."""
    repo = ROOT.parents[1]
    code = ("import sys; sys.modules['gmmvit'] = None; from snakemake.cli import main; "
            "sys.argv = ['snakemake', '--dry-run', '--cores', '1', '--quiet']; sys.exit(main())")
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
