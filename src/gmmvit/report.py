"""Cells -> results tables and plots.

Reads only the cells' records (metrics.json, and the history.csv beside each) and the measure JSONs
of ``gmmvit measure``; every number in a table or plot is a function of those. Writes:

  table.md       the paper's layout: one row per model x mask, one column per dataset with the
                 best-epoch top-1 (mean ± std over seeds), the difference to the unmasked model of
                 the same family, the paper's figure beside ours, Params / MACs / Depth
  table_last.md  the same for the last epoch
  table.csv      tidy: one row per cell
  plots/         accuracy.png, mask_delta.png, learning_curves.png, vs_paper.png

``gmmvit report RUN... --out-dir DIR [--measures PATH...] [--reference CSV] [--grid NAME]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import pandas as pd

IDENTITY = ["recipe", "dataset", "model", "mask", "seed"]
# Display order and names: the paper's table order first; unknown names (a new registry entry)
# follow in order of appearance, under their own name.
MODEL_NAMES = {"vit": "ViT", "swin": "Swin", "cait": "CaiT", "pit": "PiT", "t2t": "T2T"}
MASK_NAMES = {"none": "", "gmm": "GMM", "elm": "ELM", "rmt": "RMT"}
DATASET_NAMES = {"digits": "Digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN",
                 "tinyimagenet": "Tiny-ImageNet", "folder": "Folder"}
PAPER_SOURCE = "gmm_readme"  # the GMM paper's own table; the other source in the CSV is SPT/LSA's
REFERENCE_SHAPE = (32, 10)  # the paper counts Params / MACs at 32x32 input, 10 classes
PLOTS = ("accuracy", "mask_delta", "learning_curves", "vs_paper")


# ---------------------------------------------------------------- reading


def find_files(paths: Iterable[str | Path], name: str) -> list[Path]:
    """Files given directly, or found recursively (sorted) under folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob(name))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def load_records(metrics_files: Sequence[Path]) -> pd.DataFrame:
    """One row per cell; versions flattened to columns, the resolved recipe kept as a dict."""
    rows = []
    for path in metrics_files:
        record = json.loads(Path(path).read_text())
        versions = record.pop("versions", {}) or {}
        rows.append(record | {f"{k}_version": v for k, v in versions.items()} | {"metrics": str(path)})
    if not rows:
        raise ValueError("no metrics.json records to report")
    cells = pd.DataFrame(rows)
    duplicated = cells.duplicated(IDENTITY, keep=False)
    if duplicated.any():
        raise ValueError("several records for one cell: " + ", ".join(cells.loc[duplicated, "metrics"]))
    return cells


def load_histories(cells: pd.DataFrame) -> pd.DataFrame:
    """Every cell's history.csv (beside its metrics.json), with the cell's identity columns."""
    frames = []
    for _, cell in cells.iterrows():
        path = Path(cell["metrics"]).with_name("history.csv")
        if path.is_file():
            frames.append(pd.read_csv(path).assign(**{k: cell[k] for k in IDENTITY}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*IDENTITY, "epoch"])


def load_measures(measure_files: Sequence[Path]) -> pd.DataFrame:
    columns = ["model", "mask", "img_size", "num_classes", "params", "mask_params", "macs_all",
               "macs_paper", "depth"]
    rows = [json.loads(Path(p).read_text()) for p in measure_files]
    return pd.DataFrame(rows, columns=columns).drop_duplicates(["model", "mask", "img_size", "num_classes"])


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's figures, long: model, mask, dataset, paper_top1 (plus params_m, macs_m, depth)."""
    if path is None:
        with resources.files("gmmvit").joinpath("reference/paper_table.csv").open() as f:
            table = pd.read_csv(f)
    else:
        table = pd.read_csv(path)
    table = table[table["source"] == PAPER_SOURCE].drop(columns="source")
    datasets = [c for c in table.columns if c not in ("model", "mask", "params_m", "macs_m", "depth")]
    return table.melt(id_vars=["model", "mask", "params_m", "macs_m", "depth"], value_vars=datasets,
                      var_name="dataset", value_name="paper_top1").dropna(subset=["paper_top1"])


# ---------------------------------------------------------------- the tidy table


def _ordered(values: Iterable[str], known: dict[str, str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in known if v in present] + [v for v in present if v not in known]


def cell_table(cells: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its record, its model's measure, the paper's figure, and the paired
    difference to the unmasked cell of the same dataset, model and seed."""
    # A cell's measure is the one of its model and mask with the same parameter count: that pins
    # its image size and class count without the workflow passing them.
    by_params = measures.sort_values(["img_size", "num_classes"]) \
        .drop_duplicates(["model", "mask", "params"])
    table = cells.merge(by_params, on=["model", "mask", "params"], how="left")
    base = table[table["mask"] == "none"].set_index(["recipe", "dataset", "model", "seed"])
    key = pd.MultiIndex.from_frame(table[["recipe", "dataset", "model", "seed"]])
    for metric in ("best_top1", "last_top1"):
        # rounded as the records are (4 decimals), so the CSV shows 1.41, not 1.4099999999999966
        paired = table[metric].to_numpy() - base[metric].reindex(key).to_numpy()
        table[f"{metric}_vs_none"] = paired.round(4)
    paper = reference[["model", "mask", "dataset", "paper_top1"]]
    table = table.merge(paper, on=["model", "mask", "dataset"], how="left")
    paper_none = paper[paper["mask"] == "none"].set_index(["model", "dataset"])["paper_top1"]
    table["paper_vs_none"] = (table["paper_top1"].to_numpy() - paper_none.reindex(
        pd.MultiIndex.from_frame(table[["model", "dataset"]])).to_numpy()).round(4)
    if "recipe_config" in table:  # one JSON string per row, last: tidy, and still the whole recipe
        table["recipe_config"] = table.pop("recipe_config").map(
            lambda r: json.dumps(r, sort_keys=True) if isinstance(r, dict) else r)
    first = IDENTITY + ["best_top1", "best_epoch", "last_top1", "epochs", "best_top1_vs_none",
                        "last_top1_vs_none", "paper_top1", "paper_vs_none", "params", "mask_params",
                        "macs_all", "macs_paper", "depth", "img_size", "num_classes"]
    table = table[[c for c in first if c in table] + [c for c in table if c not in first]]
    rank = {"dataset": list(dict.fromkeys(table["dataset"])),
            "model": _ordered(table["model"], MODEL_NAMES), "mask": _ordered(table["mask"], MASK_NAMES)}
    return table.sort_values(
        IDENTITY, key=lambda col: col.map(rank[col.name].index) if col.name in rank else col
    ).reset_index(drop=True)


# ---------------------------------------------------------------- markdown


def row_label(model: str, mask: str) -> str:
    name = MODEL_NAMES.get(model, model)
    prefix = MASK_NAMES.get(mask, mask.upper())
    return f"{prefix}-{name}" if prefix else name


def _fmt_millions(value: float) -> str:
    return "—" if pd.isna(value) else f"{value / 1e6:.2f}M"


def _fmt_delta(value: float) -> str:
    return "" if pd.isna(value) else f" [{value:+.2f}]"


def _markdown(frame: pd.DataFrame) -> str:
    # Written by hand: pandas' to_markdown needs tabulate, not a dependency of the package.
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join(["---"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def summary(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std and n over seeds per dataset x model x mask, and the mean's difference to none."""
    stats = table.groupby(["dataset", "model", "mask"], sort=False)[metric].agg(["mean", "std", "count"])
    none = stats.xs("none", level="mask")["mean"] if "none" in stats.index.get_level_values("mask") \
        else pd.Series(dtype=float)
    key = pd.MultiIndex.from_arrays([stats.index.get_level_values("dataset"),
                                     stats.index.get_level_values("model")])
    stats["vs_none"] = stats["mean"].to_numpy() - none.reindex(key).to_numpy()
    return stats.reset_index()


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
    stats = summary(table, metric).set_index(["dataset", "model", "mask"])
    paper = reference.set_index(["dataset", "model", "mask"])
    datasets = list(dict.fromkeys(table["dataset"]))
    models, masks = _ordered(table["model"], MODEL_NAMES), _ordered(table["mask"], MASK_NAMES)
    paper_none = reference[reference["mask"] == "none"].set_index(["dataset", "model"])["paper_top1"]
    rows = []
    for model in models:
        for mask in masks:
            if not ((table["model"] == model) & (table["mask"] == mask)).any():
                continue
            row = {"Model": row_label(model, mask)}
            for dataset in datasets:
                column = DATASET_NAMES.get(dataset, dataset)
                if (dataset, model, mask) in stats.index:
                    s = stats.loc[(dataset, model, mask)]
                    text = f"{s['mean']:.2f}"
                    if s["count"] > 1:
                        text += f" ± {s['std']:.2f} (n={int(s['count'])})"
                    row[column] = text + (_fmt_delta(s["vs_none"]) if mask != "none" else "")
                else:
                    row[column] = "—"
                if with_paper and dataset in set(reference["dataset"]):
                    if (dataset, model, mask) in paper.index:
                        value = paper.loc[(dataset, model, mask), "paper_top1"]
                        delta = value - paper_none.get((dataset, model), float("nan"))
                        row[f"{column} (paper)"] = f"{value:.2f}" + (
                            _fmt_delta(delta) if mask != "none" else "")
                    else:
                        row[f"{column} (paper)"] = "—"
            m = _shape_measure(measures, model, mask)
            ref = reference[(reference["model"] == model) & (reference["mask"] == mask)]
            paper_note = (lambda col: f" ({ref[col].iloc[0]:.1f}M)" if with_paper and not ref.empty else "")
            row["Params"] = (_fmt_millions(m["params"]) if m is not None else "—") + paper_note("params_m")
            row["MACs (all ops)"] = _fmt_millions(m["macs_all"]) if m is not None else "—"
            row["MACs (paper conv.)"] = (_fmt_millions(m["macs_paper"]) if m is not None else "—") \
                + paper_note("macs_m")
            row["Depth"] = str(int(m["depth"])) if m is not None and pd.notna(m["depth"]) else "—"
            rows.append(row)
    return pd.DataFrame(rows)


def _unique(values: Iterable) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(v for v in values if pd.notna(v))) or "unknown"


def header(table: pd.DataFrame, grid: str | None, measures: pd.DataFrame) -> list[str]:
    """What was run and on what, read from the records."""
    lines = [f"Grid: `{grid}`. " if grid else ""]
    lines[0] += (f"{len(table)} cells: datasets {_unique(table['dataset'])}; "
                 f"models {_unique(table['model'])}; masks {_unique(table['mask'])}; "
                 f"seeds {_unique(table['seed'])}.")
    recipes = pd.DataFrame([json.loads(r) for r in table["recipe_config"]], index=table.index) \
        if "recipe_config" in table and table["recipe_config"].notna().all() else pd.DataFrame()
    recipe_line = f"Recipe: `{_unique(table['recipe'])}`"
    if not recipes.empty:
        common = [k for k in recipes.columns if recipes[k].astype(str).nunique() == 1]
        recipe_line += " resolved to " + ", ".join(f"{k}={recipes[k].iloc[0]}" for k in common)
        varying = [k for k in recipes.columns if k not in common]
        for dataset, group in recipes[varying].groupby(table["dataset"], sort=False) if varying else []:
            recipe_line += f"; for {dataset}: " + ", ".join(f"{k}={_unique(group[k])}" for k in varying)
    lines.append(recipe_line + ".")
    versions = "; ".join(f"{name} {_unique(table[f'{name}_version'])}"
                         for name in ("torch", "timm", "gmmvit", "python") if f"{name}_version" in table)
    lines.append(f"Hardware: device {_unique(table['device'])}, threads {_unique(table['threads'])}; "
                 f"{versions}. Training wall time {table['wall_time_s'].sum() / 60:.1f} min over all cells, "
                 f"median {table['train_images_per_s'].median():.0f} training images/s per cell.")
    at_reference = ((measures["img_size"] == REFERENCE_SHAPE[0])
                    & (measures["num_classes"] == REFERENCE_SHAPE[1])).any()
    lines.append(
        "Cells: mean ± std over seeds (n) where there are several seeds; [+x.xx] is the difference of "
        "the mean to the unmasked model of the same family. Params and MACs "
        + ("at 32x32 input, 10 classes (the paper's convention)" if at_reference
           else "at the smallest measured input size and class count")
        + ", with the paper's figure in parentheses; MACs (all ops) counts every operator (fvcore), "
        "MACs (paper conv.) only the paper's module-hook convention (no attention products)."
    )
    return lines


def write_tables(table: pd.DataFrame, measures: pd.DataFrame, reference: pd.DataFrame,
                 out_dir: Path, grid: str | None) -> None:
    head = header(table, grid, measures)
    paper_note = (f"(paper) columns: the GMM paper's published best-epoch top-1 ({PAPER_SOURCE} in "
                  "gmmvit/reference/paper_table.csv), single seed.")
    best = results_frame(table, measures, reference, "best_top1", with_paper=True)
    last = results_frame(table, measures, reference, "last_top1", with_paper=False)
    has_paper = any(c.endswith("(paper)") for c in best.columns)
    (out_dir / "table.md").write_text(
        "# Test top-1 (%) at the best epoch\n\n" + "\n\n".join(head + [paper_note] * has_paper) + "\n\n"
        + _markdown(best) + "\n")
    (out_dir / "table_last.md").write_text(
        "# Test top-1 (%) at the last epoch\n\n" + "\n\n".join(head) + "\n\nThe paper reports the best "
        "epoch only, so no paper figures here.\n\n" + _markdown(last) + "\n")
    table.to_csv(out_dir / "table.csv", index=False)


# ---------------------------------------------------------------- plots


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        Model=frame["model"].map(lambda m: MODEL_NAMES.get(m, m)),
        Mask=frame["mask"],
        Dataset=frame["dataset"].map(lambda d: DATASET_NAMES.get(d, d)),
    )


def _placeholder(path: Path, message: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(table: pd.DataFrame, histories: pd.DataFrame, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    cells = _labelled(table)
    models = [MODEL_NAMES.get(m, m) for m in _ordered(table["model"], MODEL_NAMES)]
    masks = _ordered(table["mask"], MASK_NAMES)
    wrap = min(4, cells["Dataset"].nunique())
    palette = dict(zip(masks, sns.color_palette(n_colors=len(masks))))  # a mask keeps its colour

    # accuracy: one dot per model x mask (mean, sd over seeds), one panel per dataset
    grid = sns.catplot(data=cells, kind="point", x="Model", y="best_top1", hue="Mask", col="Dataset",
                       col_wrap=wrap, order=models, hue_order=masks, palette=palette, errorbar="sd",
                       dodge=0.4 if len(masks) > 1 else False,  # seaborn divides by hues - 1
                       linestyle="none", sharey=False, height=3.5, aspect=1.2)
    grid.set_axis_labels("", "best-epoch test top-1 (%)").set_titles("{col_name}")
    grid.savefig(plots / "accuracy.png", dpi=100)
    plt.close(grid.figure)

    # mask minus none: paired by seed, so the seed's shared data order and init noise cancel
    deltas = cells[cells["mask"] != "none"].dropna(subset=["best_top1_vs_none"])
    if deltas.empty:
        _placeholder(plots / "mask_delta.png", "No mask-minus-none difference: the grid needs mask "
                     "'none' and at least one other mask.")
    else:
        grid = sns.catplot(data=deltas, kind="bar", x="Model", y="best_top1_vs_none", hue="Mask",
                           col="Dataset", col_wrap=min(4, deltas["Dataset"].nunique()), order=models,
                           hue_order=[m for m in masks if m != "none"], palette=palette, errorbar="sd",
                           sharey=False, height=3.5, aspect=1.2)
        for ax in grid.axes.flat:
            ax.axhline(0, color="black", linewidth=0.8)
        grid.set_axis_labels("", "mask − none, top-1 (points)").set_titles("{col_name}")
        grid.savefig(plots / "mask_delta.png", dpi=100)
        plt.close(grid.figure)

    # learning curves: test top-1 per epoch, mean and sd over seeds
    if histories.empty:
        _placeholder(plots / "learning_curves.png", "No history.csv beside the records.")
    else:
        curves = _labelled(histories)
        grid = sns.relplot(data=curves, kind="line", x="epoch", y="test_top1", hue="Mask", hue_order=masks,
                           palette=palette, row="Dataset", col="Model", col_order=models, errorbar="sd",
                           height=2.6, aspect=1.2, facet_kws={"sharey": "row", "margin_titles": True})
        grid.set_axis_labels("epoch", "test top-1 (%)").set_titles(row_template="{row_name}",
                                                                   col_template="{col_name}")
        grid.savefig(plots / "learning_curves.png", dpi=100)
        plt.close(grid.figure)

    # ours vs paper where both exist: on the diagonal, we reproduce the published figure
    both = cells.dropna(subset=["paper_top1"])
    if both.empty:
        _placeholder(plots / "vs_paper.png", "No cell of this grid is in the paper's table "
                     "(it reports CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet).")
    else:
        means = both.groupby(["Dataset", "Model", "Mask"], as_index=False).agg(
            ours=("best_top1", "mean"), paper=("paper_top1", "first"))
        grid = sns.relplot(data=means, x="paper", y="ours", hue="Model", hue_order=[m for m in models
                           if m in set(means["Model"])], style="Mask", style_order=masks, col="Dataset",
                           col_wrap=min(4, means["Dataset"].nunique()), s=80, height=3.5,
                           facet_kws={"sharex": False, "sharey": False})
        for ax in grid.axes.flat:
            lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
            hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        grid.set_axis_labels("paper's best-epoch top-1 (%)", "ours, mean over seeds (%)")
        grid.set_titles("{col_name}")
        grid.savefig(plots / "vs_paper.png", dpi=100)
        plt.close(grid.figure)


# ---------------------------------------------------------------- entry point


def report(runs: Sequence[str | Path], out_dir: str | Path, measures: Sequence[str | Path] = (),
           reference: str | Path | None = None, grid: str | None = None) -> pd.DataFrame:
    """Write the tables and plots for the cells under ``runs``; return the tidy cell table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = load_records(find_files(runs, "metrics.json"))
    measured = load_measures(find_files(measures, "*.json"))
    ref = load_reference(reference)
    table = cell_table(cells, measured, ref)
    write_tables(table, measured, ref, out, grid)
    write_plots(table, load_histories(cells), out)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmvit report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a cell's metrics.json, or a folder searched for them (e.g. results/runs)")
    parser.add_argument("--out-dir", required=True, help="where table.md, table_last.md, table.csv, plots/ go")
    parser.add_argument("--measures", nargs="*", default=[], metavar="PATH",
                        help="measure JSON files of `gmmvit measure`, or folders of them")
    parser.add_argument("--reference", help="the paper's table (default: gmmvit/reference/paper_table.csv)")
    parser.add_argument("--grid", help="the grid's name, for the tables' header")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``gmmvit report`` (argv without the subcommand); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # the CLI may pass its REMAINDER with the separator
        args = args[1:]
    ns = build_parser().parse_args(args)
    table = report(ns.runs, ns.out_dir, ns.measures, ns.reference, ns.grid)
    print(f"{len(table)} cells -> {Path(ns.out_dir) / 'table.md'}, table_last.md, table.csv, "
          f"plots/{{{','.join(PLOTS)}}}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
