"""The `gmmvit` command: what the workflow's rules call. One subcommand per step."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

# The registries' names without importing them (they import torch): `gmmvit <command> --help` must
# answer in a fraction of the second or more that importing torch takes.
from .registry import mask_names, model_names


def _measure(args: argparse.Namespace) -> int:
    from .complexity import measure
    from .masks import mask_options
    from .cell_folder import atomic_write_bytes

    from .errors import UserError

    for option, value, least in (("--img-size", args.img_size, 1), ("--num-classes", args.num_classes, 2),
                                 ("--mask-kernels", args.mask_kernels, 1)):
        if value < least:
            raise UserError(f"{option} must be at least {least}, got {value}")
    mask_kwargs = mask_options(args.mask, default_kernels=args.mask_kernels)
    record = measure(args.model, args.mask, img_size=args.img_size, num_classes=args.num_classes,
                     mask_kwargs=mask_kwargs)
    text = json.dumps(record, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(args.out), text.encode())
    print(text, end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .numerics import apply_environment

    # before torch loads: MKL and ATen read their kernel choice once, when loaded
    apply_environment(args.numerics)
    if args.device_slots != "none":
        # first thing: the claim sets CUDA_VISIBLE_DEVICES, which CUDA reads once, when torch
        # initialises it (importing torch does not; the parser does not import it at all)
        from .devices import claim_device_slot

        slot = claim_device_slot(args.device_slots, args.cells_per_gpu)
        if slot is not None:
            print(f"GPU slot {slot} (device {slot.device}) claimed under {args.device_slots}", flush=True)
    from .data import dataset_names, load_dataset
    from .recipe import resolve_recipe
    from .train import Cell, train_cell

    overrides = json.loads(args.overrides) if args.overrides else None
    recipe = resolve_recipe(args.recipe, args.recipes, overrides, args.set, dataset=args.dataset)
    kind = args.dataset_kind or args.dataset
    if kind not in dataset_names():
        raise ValueError(f"unknown dataset {kind!r}; valid names: {', '.join(dataset_names())}. "
                         "For an image folder, add --dataset-kind folder --dataset-path <its "
                         "train/ + val/ tree>")
    # Only the options given are passed, so a registered dataset that takes none still loads.
    options = {key: value for key, value in (("path", args.dataset_path), ("img_size", args.img_size))
               if value is not None}
    data = load_dataset(kind, args.data_root, name=args.dataset, **options)
    cell = Cell(args.dataset, args.model, args.mask, args.seed, args.recipe_name or args.recipe)
    train_cell(cell, recipe, args.out, data_root=args.data_root, threads=args.threads, dataset=data,
               keep_checkpoint=args.keep_checkpoint == "yes", numerics=args.numerics, dataset_kind=kind)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .data import prepare_dataset, prepared_record

    path = prepare_dataset(args.name, root=args.data_root, url=args.url)
    record = prepared_record(args.name, args.data_root)
    if record is None:  # nothing to download (digits, folder): prepare only checked it
        print(f"{args.name} is ready in {path}")
        return 0
    counts = dict(record["counts"])
    images = ", ".join(f"{n} {split}" for split, n in counts.items() if split != "classes")
    source = record["source"].removeprefix("file://")  # a local archive: show its path
    print(f"{args.name} is ready in {path}: {counts.get('classes')} classes, {images} images "
          f"(verified; from {source})")
    return 0


def _mask_spec(text: str) -> str:
    """--mask: a family or <family>-k<K>, refused with the valid ones listed."""
    from .masks import parse_mask_spec

    try:
        parse_mask_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    # Names only: every import of torch, timm or the registries waits until a command runs.
    mask_help = (f"mask spec, <family> or <family>-k<K>: one of {', '.join(mask_names())}, "
                 "or e.g. gmm-k3")

    parser = argparse.ArgumentParser(prog="gmmvit", description=__doc__,
                                     epilog="--debug (anywhere) or GMMVIT_DEBUG=1: show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="parameters, MACs (fvcore and paper convention), depth as JSON")
    p.add_argument("--model", required=True, choices=model_names())
    p.add_argument("--mask", default="none", type=_mask_spec, help=mask_help)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--mask-kernels", type=int, default=5,
                   help="K of a Gaussian-mixture mask whose spec gives none (gmm-k3 gives 3)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(func=_measure)

    p = sub.add_parser("train", help="train one (dataset, model, mask, seed, recipe) cell")
    p.add_argument("--dataset", required=True, help="the dataset's name (recorded with the cell)")
    p.add_argument("--dataset-kind", help="the registered dataset it is, e.g. folder (default: --dataset)")
    p.add_argument("--dataset-path", help="folder kind: its train/ + val/ tree (default: --data-root)")
    p.add_argument("--img-size", type=int, help="folder kind: decode images at this size (default 32)")
    p.add_argument("--model", required=True, choices=model_names())
    p.add_argument("--mask", default="none", type=_mask_spec, help=mask_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="demo", help="built-in (paper, demo, smoke) or a name in --recipes")
    p.add_argument("--recipes", help="YAML file of named recipes (name: {base: <built-in>, key: value}), "
                   "or the workflow's config.yaml")
    p.add_argument("--overrides", help="JSON object of recipe keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one recipe key")
    p.add_argument("--recipe-name", help="the name recorded in metrics.json (default: --recipe)")
    p.add_argument("--out", required=True, help="the cell's output directory")
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, help="CPU threads (default: from the environment)")
    p.add_argument("--numerics", choices=("portable", "native"), default="portable",
                   help="CPU kernels: portable (default: the same bits on any x86-64 CPU with AVX2, "
                   "one thread) or native (fastest; results tied to the CPU model)")
    p.add_argument("--keep-checkpoint", choices=("yes", "no"), default="no",
                   help="keep checkpoint.pt once the cell is done (default: remove it, ~60 MB)")
    p.add_argument("--device-slots", default="none", metavar="FOLDER",
                   help="on a box with several GPUs, claim a free (device, k) slot under FOLDER and "
                   "train on that device only (default none: the first visible device)")
    p.add_argument("--cells-per-gpu", type=int, default=1, help="with --device-slots: cells per device")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare", help="download, unpack and verify a dataset under the data root")
    p.add_argument("name")
    p.add_argument("--data-root", default="data")
    p.add_argument("--url", help="download from here instead of the official address: a mirror's URL "
                   "or a local path of the archive (default: $GMMVIT_<NAME>_URL, then the official one)")
    p.set_defaults(func=_prepare)

    # Listed for `gmmvit -h` only: main() hands `report` and `verify` to their modules' own parsers.
    sub.add_parser("report", help="aggregate the cells into results/table.md and plots")
    sub.add_parser("verify", help="re-train a results folder's cells and compare them to the digit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --debug anywhere, or GMMVIT_DEBUG=1: tracebacks for user errors too
    debug = "--debug" in argv or os.environ.get("GMMVIT_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    if debug:  # the report's and verify's own parsers read it from here
        os.environ["GMMVIT_DEBUG"] = "1"
    if argv[:1] == ["report"]:  # its own parser, options first included
        from .report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place a user's mistake becomes one line
        line = user_message(err)
        if line is None or debug:
            raise
        print(f"gmmvit {args.command}: error: {line}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


def user_message(err: Exception) -> str | None:
    """The one line for a user's mistake or a failure of the environment; None for a bug (the
    traceback is then shown). Bad values are refused with ValueError / TypeError by the recipe and
    the builders; an OSError names its file and what to do."""
    from .errors import UserError

    if isinstance(err, (UserError, ValueError, TypeError)):
        return str(err)
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        advice = {errno.ENOSPC: "no space left on the device; free some and run again",
                  errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
                  errno.ENOTDIR: "a file is where a folder should be",
                  errno.EISDIR: "a folder is where a file should be",
                  errno.ENOENT: "no such file or folder"}.get(err.errno, err.strerror or str(err))
        return where + advice
    return None


if __name__ == "__main__":
    sys.exit(main())
