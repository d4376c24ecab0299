"""The tables: table.md (the headline), table_best.md and table_last.md in the paper's layout,
table.csv (one row per cell), history.csv, and the three as one HTML page."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .files import OutputSet
from .names import DATASET_NAMES, MASK_NAMES, MODEL_NAMES, NOT_LEARNED, ordered, row_label
from .provenance_summary import provenance, selection, warnings
from .records import PAPER_SOURCE
from .stats import CONFIDENCE, MOST_SEEDS, seeds_needed, summary, usable

REFERENCE_SHAPE = (32, 10)  # the paper counts Params / MACs at 32x32 input, 10 classes
TABLES = ("table.md", "table_best.md", "table_last.md", "table.csv", "tables.html", "history.csv")

NOT_LEARNED_NOTE = (f"{NOT_LEARNED}: did not learn (train loss stayed at ln C / top-1 near chance); "
                    "not used as a baseline, left out of every mean and difference.")
MACS_NOTE = ("MACs (fvcore): fvcore's count of matrix products, linear and convolution layers, "
             "normalisation and the attention products (q·kᵀ and attention·v, through a registered "
             "handle); element-wise operations and softmax are not counted. MACs (paper conv.): the "
             "paper's module-hook convention (linear, convolution and normalisation layers only, no "
             "attention products).")


def _fmt_millions(value: float) -> str:
    return "—" if pd.isna(value) else f"{value / 1e6:.2f}M"


def cell_text(s: pd.Series) -> str:
    """One table cell: the package docstring (gmmvit.report) says what it claims."""
    if s["n"] == 0:  # nothing learned: show what there is, flagged, and nothing else
        failed = s["failed_values"]
        if s["cells"] == 1:
            return f"{failed[0]:.2f} {NOT_LEARNED}" if failed else NOT_LEARNED
        spread = f" ({min(failed):.2f}–{max(failed):.2f})" if failed else ""
        return f"{NOT_LEARNED} {s['not_learned']} of {s['cells']} seeds{spread}"
    text = f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["n"] > 1 else "")
    counts = f"n={s['n']}" + (f", {NOT_LEARNED} {s['not_learned']} of {s['cells']} seeds"
                              if s["not_learned"] else "")
    text += f" ({counts})"
    if s["mask"] != "none" and s["pairs"] >= 2:
        pairs = f", {s['pairs']} pairs" if s["pairs"] != s["n"] else ""
        text += f" [{s['diff']:+.2f} ± {s['half_width']:.2f}{pairs}]"
    return text


def _markdown(frame: pd.DataFrame) -> str:
    # Written by hand: pandas' to_markdown needs tabulate, not a dependency of the package.
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join(["---"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _shape_measure(measures: pd.DataFrame, model: str, mask: str) -> pd.Series | None:
    """The measure the table's Params/MACs columns show: the paper's 32 px / 10 classes if
    measured, otherwise the smallest shape measured for this model and mask."""
    rows = measures[(measures["model"] == model) & (measures["mask"] == mask)]
    if rows.empty:
        return None
    at_reference = rows[(rows["img_size"] == REFERENCE_SHAPE[0]) & (rows["num_classes"] == REFERENCE_SHAPE[1])]
    return (at_reference if not at_reference.empty else rows.sort_values(["img_size", "num_classes"])) \
        .iloc[0]


def results_frame(table: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame,
                  metric: str, with_paper: bool) -> pd.DataFrame:
    """The paper's layout: rows model x mask, a column per dataset (and the paper's beside it)."""
    stats_ = summary(table, metric).set_index(["dataset", "model", "mask"], drop=False)
    paper = reference.set_index(["dataset", "model", "mask"])
    datasets = list(dict.fromkeys(table["dataset"]))
    models, masks = ordered(table["model"], MODEL_NAMES), ordered(table["mask"], MASK_NAMES)
    rows = []
    for model in models:
        for mask in masks:
            if not ((table["model"] == model) & (table["mask"] == mask)).any():
                continue
            row = {"Model": row_label(model, mask)}
            for dataset in datasets:
                column = DATASET_NAMES.get(dataset, dataset)
                key = (dataset, model, mask)
                row[column] = cell_text(stats_.loc[key]) if key in stats_.index else "—"
                if with_paper and dataset in set(reference["dataset"]):
                    # the paper's single published run: its value, no difference claimed from it
                    row[f"{column} (paper)"] = f"{paper.loc[key, 'paper_top1']:.2f}" \
                        if key in paper.index else "—"
            m = _shape_measure(measures, model, mask)
            ref = reference[(reference["model"] == model) & (reference["mask"] == mask)]
            paper_note = (lambda col: f" ({ref[col].iloc[0]:.1f}M)" if with_paper and not ref.empty else "")
            row["Params"] = (_fmt_millions(m["params"]) if m is not None else "—") + paper_note("params_m")
            row["MACs (fvcore)"] = _fmt_millions(m["macs_all"]) if m is not None else "—"
            row["MACs (paper conv.)"] = (_fmt_millions(m["macs_paper"]) if m is not None else "—") \
                + paper_note("macs_m")
            row["Depth"] = str(int(m["depth"])) if m is not None and pd.notna(m["depth"]) else "—"
            rows.append(row)
    return pd.DataFrame(rows)


def seeds_line(table: pd.DataFrame, metric: str) -> str | None:
    """One line under a table: per paired comparison, the smallest difference its seeds resolve and
    how many seeds would resolve the observed one (None when no comparison has two pairs)."""
    rows = summary(table, metric)
    rows = rows[(rows["mask"] != "none") & (rows["pairs"] >= 2)]
    if rows.empty:
        return None
    several = table["dataset"].nunique() > 1
    parts = []
    for _, r in rows.iterrows():
        resolvable, needed, pairs = seeds_needed(table.loc[(table["dataset"] == r["dataset"]) & (
            table["model"] == r["model"]) & (table["mask"] == r["mask"]), f"{metric}_vs_none"])
        label = row_label(r["model"], r["mask"]) + (f" ({DATASET_NAMES.get(r['dataset'], r['dataset'])})"
                                                     if several else "")
        verdict = ("resolved" if needed is not None and needed <= pairs else
                   f"needs {needed}" if needed is not None else f"needs more than {MOST_SEEDS}"
                   if r["diff"] != 0 else "no difference to resolve")
        parts.append(f"{label} ±{resolvable:.2f}, {verdict}")
    return ("Seeds a difference needs (95% t, from each comparison's observed paired spread): the "
            "smallest difference its seeds resolve, then whether its observed difference is resolved "
            "or how many seeds would resolve it: " + "; ".join(parts) + ".")


def legend(measures: pd.DataFrame, with_paper: bool) -> str:
    at_reference = ((measures["img_size"] == REFERENCE_SHAPE[0])
                    & (measures["num_classes"] == REFERENCE_SHAPE[1])).any()
    return (
        "Cells: with n >= 2 seeds, mean ± std over the seeds that learned (n=...); [+x.xx ± h] is the "
        "difference to the unmasked model of the same family, paired by seed (only seeds present and "
        f"learned in both; \"k pairs\" when fewer than n), with h the half-width of its {CONFIDENCE:.0%} "
        "t-interval (k-1 degrees of freedom). With one seed (n=1), no difference is claimed. "
        "Params and MACs " + ("at 32x32 input, 10 classes (the paper's convention)" if at_reference
                              else "at the smallest measured input size and class count")
        + (", with the paper's figure in parentheses" if with_paper else "") + ". " + MACS_NOTE)


def write_tables(table: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame,
                 outputs: OutputSet, grid: str | None, histories: pd.DataFrame) -> None:
    """The TABLES, into ``outputs`` (written only once every file of the report is complete)."""
    title, selected, _ = selection(table)
    warned, described = warnings(table), provenance(table, grid)
    paper_note = (f"(paper) columns: the GMM paper's published best-epoch top-1 ({PAPER_SOURCE} in "
                  "gmmvit/reference/paper_table.csv), one run each: no difference is claimed from them.")
    flagged = bool((~usable(table)).any())

    html_sections: list[str] = []

    def page(heading: str, first: str, frame: pd.DataFrame, with_paper: bool, metric: str,
             note: str = "") -> str:
        has_paper = any(c.endswith("(paper)") for c in frame.columns)
        # the table first, then what it needs to be read: the seeds its differences need, the
        # flags, the legend, the provenance
        seeds = seeds_line(table, metric)
        after = [seeds] * bool(seeds) + warned + [NOT_LEARNED_NOTE] * flagged
        after += [legend(measures, with_paper and has_paper)]
        after += [paper_note] * has_paper + [note] * bool(note) + described
        html_sections.append(_html_section(heading, [first], frame, after))
        return "\n\n".join([f"# {heading}", first, _markdown(frame), *after]) + "\n"

    outputs.write_text("table.md", page(
        title, selected + (" This is the paper's own selection: table_best.md shows it beside the paper's "
                           "figures" if (table["selection"] == "test").all() else " The paper's own "
                           "selection (best test epoch) is in table_best.md, beside the paper's figures")
        + "; the last epoch is in table_last.md.",
        results_frame(table, measures, reference, "selected_top1", with_paper=False), with_paper=False,
        metric="selected_top1"))
    outputs.write_text("table_best.md", page(
        "Test top-1 (%) at the best test epoch (the paper's selection: optimistic)",
        "Selection: best test epoch, as the paper: optimistic (the epoch is chosen on the numbers it "
        "reports); for comparison with the paper's figures. The headline is in table.md ("
        + selected.rstrip(".") + ").",
        results_frame(table, measures, reference, "best_top1", with_paper=True), with_paper=True,
        metric="best_top1"))
    outputs.write_text("table_last.md", page(
        "Test top-1 (%) at the last epoch", "Selection: none, the last epoch.",
        results_frame(table, measures, reference, "last_top1", with_paper=False), with_paper=False,
        metric="last_top1", note="The paper reports the best epoch only, so no paper figures here."))
    outputs.write_text("table.csv", table.to_csv(index=False))
    # every epoch of every cell, keyed by cell: what `gmmvit verify` compares a re-trained cell with
    outputs.write_text("history.csv", histories.to_csv(index=False))
    # The same three tables as one HTML page: what `snakemake --report` shows inline (it offers
    # markdown only as a download).
    outputs.write_text("tables.html",
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>gmmvit results</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(html_sections) + "\n</body></html>\n")


HTML_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:75em}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}p{line-height:1.4}"
)


def _html_text(text: str) -> str:
    """A markdown paragraph of ours as HTML: escaped, with `code` spans kept."""
    import html
    import re

    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_section(heading: str, prose: Sequence[str], frame: pd.DataFrame, after: Sequence[str]) -> str:
    parts = [f"<h2>{_html_text(heading)}</h2>"]
    parts += [f"<p>{_html_text(p)}</p>" for p in prose if p]
    parts.append(frame.to_html(index=False, border=0, escape=True))
    parts += [f"<p>{_html_text(p)}</p>" for p in after]
    return "<section>\n" + "\n".join(parts) + "\n</section>"
