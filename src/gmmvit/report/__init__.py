"""Cells -> results tables and plots.

One module per product: ``records`` (what is read), ``stats`` (pairing by seed, t-intervals,
seeds needed), ``tables``, ``plots``, ``mask_figures``, ``provenance_summary``; ``command`` is
``gmmvit report``; ``files`` holds its one error and its all-or-nothing writes, ``names`` the
display names. This module re-exports what callers use.

Reads only the cells' records (metrics.json, and the history.csv beside each) and the measure JSONs
of ``gmmvit measure``; every number in a table or plot is a function of those. Writes them as one
set (files.OutputSet): each to a temporary file beside its place, all renamed into place once all
are complete, so a failed report leaves the previous one as it was:

  table.md        the headline: test top-1 at the SELECTED epoch (``selected_top1``: best validation
                  top-1 on a split held out from the training set, or, when the recipe holds out
                  none, the best test epoch, as the paper does: optimistic); its heading says which
  table_best.md   the best test epoch (the paper's figure), beside the paper's published numbers
  table_last.md   the last epoch
  table.csv       tidy: one row per cell, every field of its record, its measure, the paper's figure
  history.csv     every epoch of every cell, keyed by cell (what `gmmvit verify` compares with)
  plots/          accuracy.png, paired_difference.png, learning_curves.png, vs_paper.png;
                  kernels.png (accuracy against K) when the cells include K variants (gmm-k3, ...);
                  masks/<model>-<mask>.png: what each masked model learned (seed 0, the first
                  dataset), rebuilt from the cell's mask_params.pt

What a cell of the markdown tables claims, and no more:

- n >= 2 seeds: mean ± std over the seeds that learned (n=...). The difference to the unmasked model
  of the same family is paired by seed (only seeds present, and learned, in both) and shown as
  [mean difference ± half-width of its 95% t-interval, n-1 degrees of freedom].
- one seed: the value and "(n=1)"; no difference is claimed.
- a cell whose record says it did not learn (``learned: false``: train loss stayed at ln C or top-1
  near chance) is flagged ✗, left out of every mean, and no difference is computed for or against it.

Every table opens with the provenance a reviewer needs (selection, device and CPU capability, hosts,
SLURM jobs with their nodes and granted CPUs, GPU ids and device slots, library versions, source hashes, dataset fingerprints, determinism, split sizes, wall
time), and says prominently when cells differ in any of them ("⚠ mixed") or come from records
written before these fields existed ("⚠ provenance incomplete": such a record's selected epoch is
its best test epoch).

``gmmvit report RUN... --out-dir DIR [--measures PATH...] [--reference CSV] [--grid NAME] [--debug]``;
a user's mistake is one line and exit code 2 (ReportError), see command.main.
"""

from __future__ import annotations

from .command import build_parser, main, report
from .files import OutputSet, ReportError
from .mask_figures import (MASK_FIGURES, is_per_head_constant, mask_around_centre, mask_by_distance,
                           mask_figure_cells, mask_values, rebuild_masks, write_mask_figure,
                           write_mask_figures)
from .names import DATASET_NAMES, MASK_NAMES, MODEL_NAMES, NOT_LEARNED, mask_label, row_label
from .plots import KERNELS_PLOT, PLOTS, write_kernels_plot, write_plots
from .provenance_summary import (cpu_labels, numerics_line, provenance, run_on_short, scheduler,
                                 selection, warnings)
from .records import (CPU_FACTS, IDENTITY, PAPER_SOURCE, PROVENANCE, VERSIONS, find_files, flat_record,
                      load_histories, load_measures, load_records, load_reference)
from .stats import (CONFIDENCE, DEFAULT_KERNELS, KERNEL_SPEC, MOST_SEEDS, cell_table, has_kernel_variants,
                    kernel_cells, kernel_summary, seeds_needed, summary, t_interval, usable)
from .tables import (HTML_STYLE, MACS_NOTE, NOT_LEARNED_NOTE, REFERENCE_SHAPE, TABLES, cell_text, legend,
                     results_frame, seeds_line, write_tables)

__all__ = [
    "CONFIDENCE", "CPU_FACTS", "DATASET_NAMES", "DEFAULT_KERNELS", "HTML_STYLE", "IDENTITY", "KERNELS_PLOT",
    "KERNEL_SPEC", "MACS_NOTE", "MASK_FIGURES", "MASK_NAMES", "MODEL_NAMES", "MOST_SEEDS", "NOT_LEARNED",
    "NOT_LEARNED_NOTE", "PAPER_SOURCE", "PLOTS", "PROVENANCE", "REFERENCE_SHAPE", "TABLES", "VERSIONS",
    "OutputSet", "ReportError", "build_parser", "cell_table", "cell_text", "cpu_labels", "find_files",
    "flat_record", "has_kernel_variants", "is_per_head_constant", "kernel_cells", "kernel_summary",
    "legend", "load_histories", "load_measures", "load_records", "load_reference", "main",
    "mask_around_centre", "mask_by_distance", "mask_figure_cells", "mask_label", "mask_values",
    "numerics_line", "provenance", "rebuild_masks", "report", "results_frame", "row_label",
    "run_on_short", "scheduler", "seeds_line", "seeds_needed", "selection", "summary", "t_interval",
    "usable", "warnings", "write_kernels_plot", "write_mask_figure", "write_mask_figures", "write_plots",
    "write_tables",
]
