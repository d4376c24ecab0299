"""Shared fixtures. `slurm_cluster`: a real single-node SLURM cluster for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from slurm_cluster import ClusterUnavailable, SlurmCluster, start_cluster


def in_ci() -> bool:
    """CI=true (any case): tests that need a system tool fail there, instead of skipping. Not a GPU:
    CI has none, and the `cuda` tests (tests/test_cuda.py) skip there as everywhere without one."""
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(autouse=True)
def kernel_environment_is_left_as_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gmmvit train` called in-process sets portable numerics' variables (MKL_CBWR, ...) in this
    process's environment; undo them after each test, so that no later subprocess inherits them."""
    from gmmvit.numerics import PORTABLE_ENVIRONMENT

    for name in PORTABLE_ENVIRONMENT:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:  # recorded as absent, so that teardown removes what a test set
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Started once, on first use; its daemons are stopped by pid when the session ends. Where SLURM
    is missing or does not start, the tests that use it are skipped with the reason, except in CI
    (CI=true), where that is a failure: CI installs SLURM and must run them."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as why:
        if in_ci():
            pytest.fail(f"the SLURM test cluster did not start: {why}")
        pytest.skip(f"no SLURM test cluster: {why}")
    try:
        yield cluster
    finally:
        cluster.stop()
