"""The workflow on a real SLURM controller (tests/slurm_cluster.py), through the repository's profile.

A tiny grid (digits, ViT, none + gmm, the smoke recipe at 3 epochs) is built once through
`--workflow-profile workflow/profiles/slurm`; the tests read what it left (records, SLURM's own job
list, the logs), run it again, and cancel a cell mid-run to see it resume. The dry-run test of the
paper grid needs no controller. `pytest -m slurm` runs exactly these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
MASKS = ("none", "gmm")
# Status checks every 2 s instead of the plugin's 40 s start; squeue because the test cluster keeps
# no accounting (what a site without sacct adds to the profile).
FAST_STATUS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
               "--seconds-between-status-checks", "2"]


def snakemake(work: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(work, *args), capture_output=True, text=True, env=environment(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def command(work: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), *args]


def environment() -> dict[str, str]:
    # The jobs run `gmmvit` and `snakemake` from this venv (sbatch --export=ALL passes PATH on)
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def tiny_config(work: Path) -> dict:
    """digits x vit x {none, gmm}, seed 0; 3 epochs of a few seconds each (the cancel test needs
    time to cancel a cell between its first checkpoint and its end)."""
    return {
        "grid": "tiny", "data_root": "data", "results": "results", "src_dir": str(work / "src" / "gmmvit"),
        "grids": {"tiny": {"datasets": ["digits"], "models": ["vit"], "masks": list(MASKS),
                           "seeds": [0], "recipe": "smoke"}},
        "recipes": {"smoke": {"base": "smoke", "epochs": 3, "limit_train": 128, "limit_test": 64}},
        "datasets": {"digits": {"num_classes": 10, "img_size": 32}},
        "resources": {rule: {"threads": 1, "mem_mb": 1000, "runtime": 10}
                      for rule in ("train", "measure", "prepare", "report")},
    }


def make_workdir(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "src" / "gmmvit", work / "src" / "gmmvit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "config.yaml").write_text(yaml.safe_dump(tiny_config(work), sort_keys=False))
    return work


def cell_dir(work: Path, mask: str) -> Path:
    return work / f"results/runs/smoke/digits/vit-{mask}/seed0"


def record(work: Path, mask: str) -> dict:
    return json.loads((cell_dir(work, mask) / "metrics.json").read_text())


def cell_comment(mask: str) -> str:
    """The sbatch --comment the plugin gives a cell's job: rule and wildcards."""
    return f"rule_train_wildcards_smoke_digits_vit_{mask}_0"


# ---------------------------------------------------------------- the grid, built once on the cluster


@pytest.fixture(scope="module")
def built(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = make_workdir(tmp_path_factory.mktemp("slurm-grid"))
    start = time.perf_counter()
    out = snakemake(work, "--workflow-profile", str(PROFILE), *FAST_STATUS)
    print(f"\ntiny grid through SLURM: {time.perf_counter() - start:.1f} s")
    return work, out.stdout + out.stderr


def test_every_train_cell_ran_as_a_slurm_job(built: tuple[Path, str], slurm_cluster: SlurmCluster) -> None:
    work, text = built
    jobs = {job["id"]: job for job in slurm_cluster.jobs()}
    for mask in MASKS:
        cell = record(work, mask)
        job = jobs.get(cell["slurm_job_id"])
        assert job is not None, f"{mask}: job {cell['slurm_job_id']} unknown to the controller: {jobs}"
        assert job["state"] == "COMPLETED" and job["comment"] == cell_comment(mask), job
        assert f"SLURM jobid {cell['slurm_job_id']}" in text  # the plugin submitted it
        # where it ran, from the job's environment: the node and the one CPU the rule asked for
        assert cell["slurm_node"] == slurm_cluster.node and cell["host"] == slurm_cluster.node
        assert cell["granted_cpus"] == 1 and cell["threads"] == 1
        log = (work / f"results/logs/train/smoke/digits/vit-{mask}/seed0.log").read_text()
        assert f"SLURM job {cell['slurm_job_id']}" in log
        # from the cell's name to its SLURM log, as the profile documents
        slurm_log = work / f"results/logs/slurm/rule_train/smoke_digits_vit_{mask}_0/{cell['slurm_job_id']}.log"
        assert slurm_log.is_file(), sorted(p.name for p in (work / "results/logs/slurm").rglob("*"))
    # measure jobs went to SLURM too; report (and all) ran on the submitting node
    comments = [job["comment"] for job in jobs.values()]
    assert sum(c.startswith("rule_measure_") for c in comments) >= 2
    assert not [c for c in comments if c.startswith(("rule_report", "rule_all"))]
    assert re.search(r"^localrule report:", text, re.MULTILINE)
    assert (work / "results/table.md").is_file() and (work / "results/table.csv").is_file()


def test_second_run_submits_nothing(built: tuple[Path, str], slurm_cluster: SlurmCluster) -> None:
    work, _ = built
    before = {job["id"] for job in slurm_cluster.jobs()}
    out = snakemake(work, "--workflow-profile", str(PROFILE), *FAST_STATUS)
    text = out.stdout + out.stderr
    assert "Nothing to be done" in text, text
    assert "submitted with SLURM jobid" not in text
    assert {job["id"] for job in slurm_cluster.jobs()} == before


def cancel_at_first_checkpoint(run: subprocess.Popen, checkpoint: Path, slurm_cluster: SlurmCluster) -> str:
    """Wait for the gmm cell's first staged checkpoint, then scancel its running job; its id."""
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        assert run.poll() is None, f"snakemake ended before the first checkpoint:\n{run.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.2)
    running = [j for j in slurm_cluster.jobs() if j["comment"] == cell_comment("gmm") and j["state"] == "RUNNING"]
    assert len(running) == 1, f"the cell's job is not running at its first checkpoint: {running}"
    subprocess.run(["scancel", running[0]["id"]], check=True)
    return running[0]["id"]


def test_cancelled_cell_resumes_to_the_numbers_of_an_uninterrupted_run(
        built: tuple[Path, str], slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scancel a train job after its first epoch's checkpoint; the next run resubmits it, it resumes
    from that epoch and ends where the uninterrupted cell of `built` (same config) ended."""
    reference = record(built[0], "gmm")
    work = make_workdir(tmp_path)
    config = tiny_config(work)
    config["grids"]["tiny"]["masks"] = ["gmm"]
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = cell_dir(work, "gmm") / ".staging" / "checkpoint.pt"  # a run works in .staging/
    # --retries 0: the profile's own retry would resubmit within this run; the point here is the next run
    run = subprocess.Popen(command(work, "--workflow-profile", str(PROFILE), *FAST_STATUS, "--retries", "0"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
    try:
        cancelled = cancel_at_first_checkpoint(run, checkpoint, slurm_cluster)
        first_output = run.communicate(timeout=120)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, first_output  # the cell failed: cancelled
    assert not (cell_dir(work, "gmm") / "metrics.json").exists()
    assert checkpoint.exists()  # what the next run resumes from

    out = snakemake(work, "--workflow-profile", str(PROFILE), *FAST_STATUS)
    resumed = record(work, "gmm")
    assert resumed["slurm_job_id"] not in (None, cancelled)  # a new SLURM job
    log = (work / "results/logs/train/smoke/digits/vit-gmm/seed0.log").read_text()
    assert re.search(r"resuming .* after epoch [12]\b", log), log
    for key in ("selected_top1", "best_top1", "last_top1", "selected_epoch", "best_epoch"):
        assert resumed[key] == reference[key], (key, resumed[key], reference[key])
    assert len((cell_dir(work, "gmm") / "history.csv").read_text().splitlines()) == 1 + 3
    assert not checkpoint.exists()  # removed once the record was written
    assert "submitted with SLURM jobid" in out.stdout + out.stderr


def history_numbers(work: Path, mask: str) -> list[list[str]]:
    """Every epoch's numbers of a cell, without images/s (the clock)."""
    lines = (cell_dir(work, mask) / "history.csv").read_text().splitlines()
    return [line.split(",")[:-1] for line in lines]


def test_slurm_and_local_runs_give_the_same_numbers_to_the_digit(built: tuple[Path, str], tmp_path: Path) -> None:
    """README: the same numbers on a SLURM job and a local run alike. The tiny grid again, locally
    (no profile): every epoch's numbers and the final weights' sha256 equal the SLURM cells'."""
    work = make_workdir(tmp_path / "local")
    snakemake(work, "--cores", "2", timeout=600)
    for mask in MASKS:
        slurm, local = record(built[0], mask), record(work, mask)
        assert slurm["slurm_job_id"] and local["slurm_job_id"] is None  # one of each, truly
        assert history_numbers(work, mask) == history_numbers(built[0], mask), mask
        assert local["weights_sha256"] == slurm["weights_sha256"], mask
        assert local["source_hash"] == slurm["source_hash"] and local["numerics"] == slurm["numerics"]


def test_the_profile_resubmits_a_cancelled_cell_once_and_it_resumes(
        built: tuple[Path, str], slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The profile's `retries: 1`: a train job cancelled after its first checkpoint (what a node
    failure, preemption or time-out looks like to Snakemake) is resubmitted within the same run,
    resumes from that checkpoint, and ends with the uninterrupted cell's history."""
    work = make_workdir(tmp_path / "retried")
    config = tiny_config(work)
    config["grids"]["tiny"]["masks"] = ["gmm"]
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = cell_dir(work, "gmm") / ".staging" / "checkpoint.pt"
    run = subprocess.Popen(command(work, "--workflow-profile", str(PROFILE), *FAST_STATUS),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
    try:
        cancelled = cancel_at_first_checkpoint(run, checkpoint, slurm_cluster)
        output = run.communicate(timeout=300)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output  # the one run finished: the retry made up for the cancel
    resumed = record(work, "gmm")
    assert resumed["slurm_job_id"] not in (None, cancelled)
    jobs = [j for j in slurm_cluster.jobs() if j["comment"] == cell_comment("gmm") and j["id"] in
            (cancelled, resumed["slurm_job_id"])]
    assert {j["state"] for j in jobs} == {"CANCELLED", "COMPLETED"}, jobs
    log = (work / "results/logs/train/smoke/digits/vit-gmm/seed0.log").read_text()
    assert re.search(r"resuming .* after epoch [12]\b", log), log
    assert history_numbers(work, "gmm") == history_numbers(built[0], "gmm")
    assert resumed["weights_sha256"] == record(built[0], "gmm")["weights_sha256"]


def test_a_gpu_train_job_asks_the_controller_for_one_gpu(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`train_on: gpu`: the train job is submitted with the profile's GPU options and the controller
    records one GPU for it (`scontrol show job`); measure jobs ask for none. The test cluster's GPU
    is a generic resource without a device, so the cell itself trains on the CPU."""
    work = make_workdir(tmp_path / "gpu")
    config = tiny_config(work)
    config["grids"]["tiny"]["masks"] = ["none"]
    config["recipes"]["smoke"]["epochs"] = 1
    config["train_on"] = "gpu"
    config["resources"]["train_gpu"] = {"threads": 1, "mem_mb": 1000, "runtime": 10, "gpu": 1}
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(work, "--workflow-profile", str(PROFILE), *FAST_STATUS, timeout=600)

    def shown(job: str) -> str:
        return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout

    train = shown(record(work, "none")["slurm_job_id"])
    assert re.search(r"TresPerJob=gres[:/]gpu:1\b", train), train  # sbatch --gpus=1, as the profile asks
    measures = [j["id"] for j in slurm_cluster.jobs() if j["comment"].startswith("rule_measure_")]
    assert measures and not any("gres/gpu" in shown(job) for job in measures)


# ---------------------------------------------------------------- the paper grid, planned through the profile


def planned_train_jobs(work: Path, *config: str) -> tuple[list[str], str]:
    """The `resources:` line of every train job of a dry run of the paper grid through the profile,
    and the dry run's whole output."""
    out = snakemake(work, "--dry-run", "--workflow-profile", str(PROFILE), "--config", "grid=paper", *config)
    text = out.stdout + out.stderr
    jobs = re.findall(r"^rule train:\n(?:\s+\w+:.*\n)*?\s+resources: (.*)$", text, re.MULTILINE)
    assert len(jobs) == 180, f"{len(jobs)} train jobs planned:\n{text[-3000:]}"
    return jobs, text


def test_paper_grid_train_jobs_ask_for_a_gpu_only_when_configured(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text()) | {"src_dir": str(REPO / "src/gmmvit")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    on_cpu, _ = planned_train_jobs(tmp_path)
    assert all(re.search(r"\bgpu=0\b", r) for r in on_cpu), on_cpu[0]
    on_gpu, _ = planned_train_jobs(tmp_path, "resources={train: {gpu: 1}}")
    assert all(re.search(r"\bgpu=1\b", r) for r in on_gpu), on_gpu[0]
    # the one switch for the paper grid on GPUs: a GPU, the GPU runtime, CPUs for the data path
    # (threads are not checked here: a dry run caps them at the local cores)
    switched, _ = planned_train_jobs(tmp_path, "train_on=gpu")
    gpu_resources = config["resources"]["train_gpu"]
    for resources in switched:
        assert re.search(r"\bgpu=1\b", resources), resources
        assert f"mem_mb={gpu_resources['mem_mb']}," in resources
        assert f"runtime={gpu_resources['runtime']}," in resources
    # the plugin turns gpu=N into `sbatch --gpus=N` and asks for none when N is 0
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Job:  # what set_gres_string reads of a job
        def __init__(self, resources: str) -> None:
            self.resources = Resources({k: int(v) if v.isdigit() else v for k, v in
                                        re.findall(r"(\w+)=([^,]+)", resources)})

    class Resources(dict):
        __getattr__ = dict.__getitem__

    assert set_gres_string(Job(on_cpu[0])).strip() == ""
    assert set_gres_string(Job(on_gpu[0])).strip() == "--gpus=1"


def test_prepare_and_report_are_local_rules() -> None:
    """Run on the submitting node: downloads need the internet, which compute nodes often lack.
    (A dry run does not say which jobs are local; the Snakefile's localrules directive does.)"""
    snakefile = (REPO / "Snakefile").read_text()
    block = re.search(r"^localrules:\n((?:\s+\w+,?\n)+)", snakefile, re.MULTILINE)
    assert block and {"prepare", "report"} <= set(re.findall(r"\w+", block.group(1)))
