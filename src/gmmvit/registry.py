"""What the package holds, read from its files without importing them (so without torch).

- The registries' entries: a model is a module of ``gmmvit/models/``, a mask family a module of
  ``gmmvit/masks/``, named as registered; the helper modules below are not entries.
- The dataset kinds and each one's module of ``gmmvit/data/`` (several kinds may share one).
- The code a job runs: its step's module, its model's, its mask family's and its dataset kind's
  modules, and every package file those import (read from their import statements with ``ast``).
  The workflow makes these files a cell's inputs, and ``gmmvit train`` records their hash: editing a
  file reruns, and changes the recorded hash of, exactly the cells that run it; adding a model, a
  family or a dataset (a new module) touches no existing cell.

- A config's recipe entry: which of its keys override the base recipe for one dataset.

Used by ``gmmvit.models``, ``gmmvit.masks``, ``gmmvit.data``, ``gmmvit.recipe``, the torch-free
``gmmvit`` command line and the workflow (workflow/rules/common.smk).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import pkgutil
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
HELPER_MODULES = {"models": frozenset({"common"}), "masks": frozenset({"base"})}
NO_MASK = "none"  # the unmasked baseline: a mask name without a module
# Dataset kind -> its module in gmmvit/data/, in registry order (the offline default first). A kind's
# module registers its spec under the kind's name (gmmvit.data.register_dataset checks this map).
DATASET_MODULES = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "svhn": "svhn",
                   "tinyimagenet": "tinyimagenet", "folder": "folder"}


def entries(registry: str, root: Path = PACKAGE_ROOT) -> list[str]:
    """The entries of registry package ``registry`` ("models" or "masks"), from its module files."""
    return sorted(m.name for m in pkgutil.iter_modules([str(root / registry)])
                  if not m.name.startswith("_") and m.name not in HELPER_MODULES[registry])


def model_names(root: Path = PACKAGE_ROOT) -> list[str]:
    return entries("models", root)


def family_names(root: Path = PACKAGE_ROOT) -> list[str]:
    return entries("masks", root)


def mask_names(root: Path = PACKAGE_ROOT) -> list[str]:
    """``none``, then every family."""
    return [NO_MASK, *family_names(root)]


# ---------------------------------------------------------------- the code a job runs


def module_file(root: Path, parts: tuple[str, ...]) -> Path | None:
    """The file of module gmmvit.<parts> under root: a package's __init__.py, else a module (Python's
    order when both exist)."""
    for candidate in [root.joinpath(*parts, "__init__.py")] + (
            [root.joinpath(*parts).with_suffix(".py")] if parts else []):
        if candidate.is_file():
            return candidate
    return None


def with_packages(root: Path, parts: tuple[str, ...]) -> set[str]:
    """Module gmmvit.<parts> and the __init__.py of every package above it (Python runs those too)."""
    files = (module_file(root, parts[:depth]) for depth in range(len(parts) + 1))
    return {str(f) for f in files if f is not None}


@functools.cache
def imported_files(path: str, root: str) -> frozenset[str]:
    """The package files one file imports, from any import statement in it (inside functions too)."""
    top, file = Path(root), Path(path)
    package = file.parent.relative_to(top).parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gmmvit":
                    found |= with_packages(top, tuple(alias.name.split(".")[1:]))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        dotted = tuple(node.module.split(".")) if node.module else ()
        if node.level:  # relative: from . / .. / .x import y
            if node.level - 1 > len(package):
                raise ValueError(f"{path}: a relative import goes above the gmmvit package")
            target = package[: len(package) - node.level + 1] + dotted
        elif dotted[:1] == ("gmmvit",):
            target = dotted[1:]
        else:
            continue
        found |= with_packages(top, target)
        for alias in node.names:  # from .models import vit: a submodule
            if module_file(top, target + (alias.name,)):
                found |= with_packages(top, target + (alias.name,))
    return frozenset(found)


def code_files(*modules: str, root: Path = PACKAGE_ROOT) -> list[str]:
    """``modules`` (paths under the package, e.g. "train.py", "models/vit.py") and every package file
    they import, directly or not, as sorted absolute paths."""
    todo: set[str] = set()
    for name in modules:
        if not (root / name).is_file():
            raise ValueError(f"{root} has no {name} (is it the gmmvit package folder?)")
        todo |= with_packages(root, Path(name).with_suffix("").parts)
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        seen.add(path)
        todo |= imported_files(path, str(root)) - seen
    return sorted(seen)


def dataset_module(kind: str) -> str:
    """The module of dataset kind ``kind``, as a path under the package: "data/cifar.py"."""
    if kind not in DATASET_MODULES:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(DATASET_MODULES)}")
    return f"data/{DATASET_MODULES[kind]}.py"


def cell_modules(step: str, model: str, family: str, dataset_kind: str | None) -> list[str]:
    """The modules a cell's job starts from: its step's (train.py, complexity.py), its model's, its
    mask family's and its dataset kind's (None for a step that reads no dataset: measuring); no
    other model's, family's or kind's."""
    return ([step, f"models/{model}.py"] + ([f"masks/{family}.py"] if family != NO_MASK else [])
            + ([dataset_module(dataset_kind)] if dataset_kind is not None else []))


def code_hash(files: list[str], root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the files' paths (relative to root) and bytes, 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(Path(f).resolve() for f in files):
        digest.update(str(path.relative_to(root.resolve())).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- a config's recipes


def recipe_keys(spec: dict[str, Any] | None, dataset: str | None) -> dict[str, Any]:
    """The recipe keys a config entry ``{base: <built-in>, description: ..., key: value, ...,
    per_dataset: {<dataset>: {key: value}}}`` sets over its base: its own keys, then ``dataset``'s.
    ``gmmvit train --recipes`` and the workflow both read an entry through this one function."""
    spec = spec or {}
    own = {k: v for k, v in spec.items() if k not in ("base", "description", "per_dataset")}
    return own | ((spec.get("per_dataset") or {}).get(dataset) or {})
