"""`gmmvit verify`: re-trains a results folder's cells and compares them to the digit, and says
where and why a cell differs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

GMMVIT = [sys.executable, "-m", "gmmvit.cli"]


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(GMMVIT + ["verify", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder as the workflow commits it: two real smoke cells (one epoch each, portable
    numerics) and `gmmvit report`'s tables and history.csv."""
    root = tmp_path_factory.mktemp("committed")
    for mask in ("none", "gmm"):
        out = root / "runs" / "smoke" / "digits" / f"vit-{mask}" / "seed0"
        subprocess.run(GMMVIT + ["train", "--dataset", "digits", "--model", "vit", "--mask", mask,
                                 "--seed", "0", "--recipe", "smoke", "--set", "epochs=2", "--threads", "1",
                                 "--out", str(out)], check=True, capture_output=True, timeout=600)
    subprocess.run(GMMVIT + ["report", str(root / "runs"), "--out-dir", str(root / "results")],
                   check=True, capture_output=True, timeout=600)
    return root / "results"


def test_a_faithful_folder_is_reproduced_and_a_changed_one_is_caught(committed: Path, tmp_path: Path) -> None:
    table = pd.read_csv(committed / "table.csv")
    assert set(table["numerics"]) == {"portable"} and table["weights_sha256"].str.len().eq(64).all()

    run = verify(str(committed), "--scratch", str(tmp_path / "a"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "reproduced 2/2" in run.stdout
    assert run.stdout.count("every epoch and the final weights equal") == 2

    # one printed digit of one epoch changed: caught, with the epoch and column named
    history = pd.read_csv(committed / "history.csv")
    row = history.index[(history["mask"] == "gmm") & (history["epoch"] == 2)][0]
    history.loc[row, "test_loss"] += 1e-6
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    history.to_csv(tampered / "history.csv", index=False)
    # and the other cell's weights recorded as something else
    table.loc[table["mask"] == "none", "weights_sha256"] = "0" * 64
    table.loc[table["mask"] == "none", "cpu_model_name"] = "Another CPU"
    table.to_csv(tampered / "table.csv", index=False)
    run = verify(str(tampered), "--scratch", str(tmp_path / "b"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "reproduced 0/2" in run.stdout
    assert "smoke/digits/vit-gmm/seed0: history differs from epoch 2: test_loss" in run.stdout
    assert "smoke/digits/vit-none/seed0: final weights differ" in run.stdout
    # provenance side by side, with what differs marked
    assert any(line.lstrip().startswith("≠ cpu_model_name") and "Another CPU" in line
               for line in run.stdout.splitlines())


def test_cells_and_max_choose_and_a_bad_choice_is_one_line(committed: Path, tmp_path: Path) -> None:
    run = verify(str(committed), "--cells", "smoke/digits/vit-gmm/*", "--scratch", str(tmp_path / "c"))
    assert run.returncode == 0 and "verifying 1 of 2 cells" in run.stdout and "reproduced 1/1" in run.stdout
    run = verify(str(committed), "--cells", "nothing/*")
    assert run.returncode == 2 and "matches no cell" in run.stderr and "Traceback" not in run.stderr
    run = verify(str(tmp_path))
    assert run.returncode == 2 and "table.csv not found" in run.stderr
