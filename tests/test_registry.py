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


def test_a_cell_runs_its_own_model_and_family_and_what_they_import() -> None:
    vit_gmm = relative(registry.code_files(*registry.cell_modules("train.py", "vit", "gmm")))
    assert {"train.py", "attention.py", "models/vit.py", "masks/gmm.py", "masks/base.py"} <= vit_gmm
    assert not vit_gmm & {"models/swin.py", "models/pit.py", "masks/elm.py", "report.py"}
    vit_none = relative(registry.code_files(*registry.cell_modules("train.py", "vit", "none")))
    assert "masks/gmm.py" not in vit_none and vit_none < vit_gmm
    # t2t builds on vit's blocks: editing vit.py must reach it
    assert "models/vit.py" in relative(registry.code_files(*registry.cell_modules("train.py", "t2t", "none")))


def test_the_recorded_hash_moves_with_the_code_a_cell_runs_only(tmp_path: Path) -> None:
    copy = tmp_path / "gmmvit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def hashes() -> dict[tuple[str, str], str]:
        return {(model, mask): registry.code_hash(
                    registry.code_files(*registry.cell_modules("train.py", model, mask), root=copy), root=copy)
                for model in ("vit", "swin") for mask in ("none", "gmm", "elm")}

    before = hashes()
    assert len(set(before.values())) == 6  # each model x mask runs different code
    # the copy hashes as the installed package does (paths are relative)
    assert before[("vit", "gmm")] == source_hash("vit", "gmm")
    gmm = copy / "masks" / "gmm.py"
    gmm.write_text(gmm.read_text() + "\n# an edit\n")
    (copy / "masks" / "newprior.py").write_text("# a new family: no existing cell runs it\n")
    after = hashes()
    changed = {cell for cell in before if before[cell] != after[cell]}
    assert changed == {("vit", "gmm"), ("swin", "gmm")}


def test_the_workflow_parses_without_the_package_importable() -> None:
    """With --software-deployment-method conda only the jobs' environment has gmmvit: snakemake's own
    Python must plan the grid without it (the workflow loads registry.py by its path)."""
    repo = ROOT.parents[1]
    code = ("import sys; sys.modules['gmmvit'] = None; from snakemake.cli import main; "
            "sys.argv = ['snakemake', '--dry-run', '--cores', '1', '--quiet']; sys.exit(main())")
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
