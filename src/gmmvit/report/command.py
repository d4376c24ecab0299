"""`gmmvit report`: read the cells, compute, and write the whole set of tables and plots at once;
its argument parser, and the one place its errors become one line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .files import OutputSet, ReportError
from .mask_figures import MASK_FIGURES, mask_figure_cells, write_mask_figures
from .plots import KERNELS_PLOT, PLOTS, PLOTS_DIR, write_kernels_plot, write_plots
from .records import find_files, load_histories, load_measures, load_records, load_reference
from .stats import cell_table, has_kernel_variants
from .tables import TABLES, write_tables


def report(runs: Sequence[str | Path], out_dir: str | Path, measures: Sequence[str | Path] = (),
           reference: str | Path | None = None, grid: str | None = None) -> pd.DataFrame:
    """Write the tables and plots for the cells under ``runs``; return the tidy cell table. All is
    read and computed first, then written as one set (OutputSet): no file in ``out_dir`` is replaced
    before every new one is complete, and a failure leaves the previous report as it was."""
    metrics = find_files(runs, "metrics.json")
    if not metrics:
        raise ReportError(f"no metrics.json under {', '.join(map(str, runs))}: train the cells first "
                          "(snakemake), or give the folder that holds them (e.g. results/runs)")
    cells = load_records(metrics)
    measured = load_measures(find_files(measures, "*.json", option="--measures"))
    ref = load_reference(reference)
    table = cell_table(cells, measured, ref)
    histories = load_histories(cells)
    folders = (".", PLOTS_DIR, f"{PLOTS_DIR}/{MASK_FIGURES}")
    with OutputSet(out_dir, folders, last=[TABLES[0]]) as outputs:  # the headline appears last
        write_tables(table, measured, ref, outputs, grid, histories)
        write_plots(table, histories, outputs)
        if has_kernel_variants(table["mask"]):
            write_kernels_plot(table, outputs)
        write_mask_figures(table, outputs)
    return table


def build_parser() -> argparse.ArgumentParser:
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package's first paragraph
    parser = argparse.ArgumentParser(prog="gmmvit report", description=summary)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a cell's metrics.json, or a folder searched for them (e.g. results/runs)")
    parser.add_argument("--out-dir", required=True, help=f"where {', '.join(TABLES)} and plots/ go")
    parser.add_argument("--measures", nargs="*", default=[], metavar="PATH",
                        help="measure JSON files of `gmmvit measure`, or folders of them")
    parser.add_argument("--reference", help="the paper's table (default: gmmvit/reference/paper_table.csv)")
    parser.add_argument("--grid", help="the grid's name, for the tables' header")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error, too (also GMMVIT_DEBUG=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``gmmvit report`` (argv without the subcommand); returns the exit code. A user's mistake or a
    failure of the environment (a UserError) is one line on stderr and exit code 2; any other error
    is a bug and keeps its traceback, which --debug or GMMVIT_DEBUG=1 shows for both."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # the CLI may pass its REMAINDER with the separator
        args = args[1:]
    ns = build_parser().parse_args(args)
    try:
        table = report(ns.runs, ns.out_dir, ns.measures, ns.reference, ns.grid)
    except UserError as err:
        if ns.debug or os.environ.get("GMMVIT_DEBUG") == "1":
            traceback.print_exc()
        print(f"gmmvit report: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # the OutputSet has removed its temporary files
        print("gmmvit report: interrupted", file=sys.stderr)
        return 130
    plots = [*PLOTS, KERNELS_PLOT] if has_kernel_variants(table["mask"]) else PLOTS
    figures = len(mask_figure_cells(table))
    print(f"{len(table)} cells -> {Path(ns.out_dir) / TABLES[0]}, {', '.join(TABLES[1:])}, "
          f"plots/{{{','.join(plots)}}}.png, {figures} mask figures in plots/{MASK_FIGURES}/")
    return 0
