"""The plots: accuracy per seed, paired differences, learning curves and ours against the paper,
for every grid; accuracy against K when the cells include K variants (gmm-k3, ...)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .files import OutputSet
from .names import DATASET_NAMES, MASK_NAMES, MODEL_NAMES, NOT_LEARNED, mask_label, ordered, row_label
from .provenance_summary import run_on_short, selection
from .stats import CONFIDENCE, kernel_summary, summary, usable

PLOTS = ("accuracy", "paired_difference", "learning_curves", "vs_paper")  # written for every grid
KERNELS_PLOT = "kernels"  # written only when the cells include K variants (gmm-k3, ...)
PLOTS_DIR = "plots"  # under the report's --out-dir


def png(outputs: OutputSet, name: str) -> Path:
    """Where plot ``name`` (plots/<name>.png) is drawn first: its temporary file in ``outputs``.
    The format is given to savefig, because that file's name does not end in .png."""
    return outputs.temp_path(f"{PLOTS_DIR}/{name}.png")


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        Model=frame["model"].map(lambda m: MODEL_NAMES.get(m, m)),
        Mask=frame["mask"],
        Dataset=frame["dataset"].map(lambda d: DATASET_NAMES.get(d, d)),
    )


def placeholder_figure(path: Path, message: str) -> None:
    """A figure that says why there is no plot, at ``path`` (a temporary file of an OutputSet)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _panels(n: int, width: float = 4.2, height: float = 3.6):
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.9), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _title(fig, what: str, table: pd.DataFrame, selection_short: str | None, grid=None) -> None:
    """Title the figure with what it shows, what the cells ran on and the epoch selection."""
    import textwrap

    lines = [what, f"run on: {run_on_short(table)}"
             + (f"; selection: {selection_short}" if selection_short else "")]
    lines = [part for line in lines for part in textwrap.wrap(line, width=int(fig.get_figwidth() * 13))]
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.set_figheight(fig.get_figheight() + 0.2 * len(lines))  # the title's room, not the panels'
    # a seaborn grid keeps room on the right for its legend (private, hence the default)
    left, bottom, right, _ = getattr(grid, "_tight_layout_rect", None) or (0, 0, 1, 1)
    fig.tight_layout(rect=(left, bottom, right, 1 - 0.2 * len(lines) / fig.get_figheight()))


def write_plots(table: pd.DataFrame, histories: pd.DataFrame, outputs: OutputSet) -> None:
    """The PLOTS, into ``outputs`` (written only once every file of the report is complete)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    sns.set_theme(style="whitegrid", context="notebook")
    _, _, chosen = selection(table)
    ok = usable(table)
    datasets = list(dict.fromkeys(table["dataset"]))
    models, masks = ordered(table["model"], MODEL_NAMES), ordered(table["mask"], MASK_NAMES)
    palette = dict(zip(masks, sns.color_palette(n_colors=len(masks))))  # a mask keeps its colour
    failed_marker = dict(marker="x", color="crimson", s=70, linewidths=2, zorder=4)
    width = 0.6 / max(len(masks), 1)

    # accuracy: every seed (dots), mean and sd over the seeds that learned, ✗ for those that did not
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for i, model in enumerate(models):
            for j, mask in enumerate(masks):
                cells = table[(table["dataset"] == dataset) & (table["model"] == model) & (table["mask"] == mask)]
                if cells.empty:
                    continue
                x = i + (j - (len(masks) - 1) / 2) * width
                learned = ok[cells.index]
                good, bad = cells.loc[learned, "selected_top1"], cells.loc[~learned, "selected_top1"]
                ax.scatter([x] * len(good), good, color=palette[mask], s=14, alpha=0.5, zorder=2)
                if len(good):
                    ax.errorbar(x, good.mean(), yerr=good.std() if len(good) > 1 else None, fmt="o",
                                color=palette[mask], markersize=7, capsize=3, zorder=3)
                ax.scatter([x] * len(bad), bad, **failed_marker)
        ax.set_xticks(range(len(models)), [MODEL_NAMES.get(m, m) for m in models])
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(DATASET_NAMES.get(dataset, dataset))
        ax.set_ylabel("test top-1 (%)")
    handles = [Line2D([], [], marker="o", linestyle="none", color=palette[m], label=row_label("", m).strip("-")
                      or "none") for m in masks]
    if (~ok).any():
        handles.append(Line2D([], [], marker="x", linestyle="none", color="crimson", markeredgewidth=2,
                              label=f"{NOT_LEARNED} did not learn"))
    axes[-1].legend(handles=handles, fontsize=8, loc="best")
    _title(fig, "Test top-1 at the selected epoch: dots = seeds, marker = mean ± sd over seeds that learned",
           table, chosen)
    fig.savefig(png(outputs, "accuracy"), format="png", dpi=100)
    plt.close(fig)

    # paired differences: mean and 95% t-interval where there are >= 2 pairs, bare points otherwise
    diffs = summary(table, "selected_top1")
    diffs = diffs[diffs["mask"] != "none"]
    if diffs.empty or table.loc[table["mask"] == "none"].empty:
        placeholder_figure(png(outputs, "paired_difference"), "No mask-minus-none difference: the grid needs "
                     "mask 'none' and at least one other mask.")
    else:
        labels = [row_label(mo, ma) for mo in models for ma in masks if ma != "none"]
        fig, axes = _panels(len(datasets), height=max(3.2, 0.5 * len(labels) + 2.0))
        for ax, dataset in zip(axes, datasets):
            for _, s in diffs[diffs["dataset"] == dataset].iterrows():
                y = labels.index(row_label(s["model"], s["mask"]))
                colour = palette[s["mask"]]
                if s["pairs"] >= 2:
                    ax.errorbar(s["diff"], y, xerr=s["half_width"], fmt="o", color=colour, capsize=4)
                    ax.annotate(f"n={s['pairs']}", (s["diff"], y), xytext=(0, 7), textcoords="offset points",
                                ha="center", fontsize=7)
                else:
                    points = table[(table["dataset"] == dataset) & (table["model"] == s["model"])
                                   & (table["mask"] == s["mask"])]["selected_top1_vs_none"].dropna()
                    ax.scatter(points, [y] * len(points), facecolors="none", edgecolors="grey", s=40)
                    if len(points):
                        ax.annotate("n=1: no interval", (points.iloc[0], y), xytext=(0, 7),
                                    textcoords="offset points", ha="center", fontsize=7, color="dimgrey")
                    else:  # baseline missing or did not learn: nothing to compare
                        ax.annotate("no usable pair", (0.5, y), xycoords=("axes fraction", "data"),
                                    ha="center", va="center", fontsize=7, color="dimgrey")
            ax.axvline(0, color="black", linewidth=0.8)
            ax.margins(x=0.2)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_title(DATASET_NAMES.get(dataset, dataset))
            ax.set_xlabel("masked − unmasked (points)")
        _title(fig, f"Paired difference to the unmasked model: mean and {CONFIDENCE:.0%} t-interval; "
               "hollow grey = single pair, no interval", table, chosen)
        fig.savefig(png(outputs, "paired_difference"), format="png", dpi=100)
        plt.close(fig)

    # learning curves: one line per seed (a failed seed stays visible), test solid, validation dashed
    if histories.empty or "test_top1" not in histories:
        placeholder_figure(png(outputs, "learning_curves"), "No history.csv beside the records.")
    else:
        splits = {"test_top1": "test", "val_top1": "validation"}
        present = [c for c in splits if c in histories and histories[c].notna().any()]
        curves = _labelled(histories).melt(id_vars=["Dataset", "Model", "Mask", "seed", "epoch"],
                                           value_vars=present, var_name="split", value_name="top1") \
            .dropna(subset=["top1"])
        curves["split"] = curves["split"].map(splits)
        grid = sns.relplot(data=curves, kind="line", x="epoch", y="top1", hue="Mask", hue_order=masks,
                           palette=palette, style="split", style_order=[splits[c] for c in present],
                           units="seed", estimator=None, row="Dataset", col="Model",
                           col_order=[MODEL_NAMES.get(m, m) for m in models], height=2.6, aspect=1.2,
                           facet_kws={"sharey": "row", "margin_titles": True})
        grid.set_axis_labels("epoch", "top-1 (%)").set_titles(row_template="{row_name}",
                                                              col_template="{col_name}")
        _title(grid.figure, "Top-1 per epoch, one line per seed: test (solid)"
               + (", validation (dashed)" if "val_top1" in present else ""), table, None, grid)
        grid.savefig(png(outputs, "learning_curves"), format="png", dpi=100)
        plt.close(grid.figure)

    # ours (best test epoch, as the paper selects) vs the paper: on the diagonal, we reproduce it
    both = table.dropna(subset=["paper_top1"])
    if both.empty:
        placeholder_figure(png(outputs, "vs_paper"), "No cell of this grid is in the paper's table "
                     "(it reports CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet).")
    else:
        shown = list(dict.fromkeys(both["dataset"]))
        fig, axes = _panels(len(shown), width=4.0, height=4.0)
        for ax, dataset in zip(axes, shown):
            cells = both[both["dataset"] == dataset]
            for (model, mask), group in cells.groupby(["model", "mask"], sort=False):
                paper, good = group["paper_top1"].iloc[0], group.loc[ok[group.index], "best_top1"]
                bad = group.loc[~ok[group.index], "best_top1"]
                if len(good):
                    ax.errorbar(paper, good.mean(), yerr=good.std() if len(good) > 1 else None, fmt="o",
                                color=palette[mask], capsize=3)
                    ax.annotate(f"{row_label(model, mask)} (n={len(good)})", (paper, good.mean()),
                                xytext=(4, 4), textcoords="offset points", fontsize=7)
                ax.scatter([paper] * len(bad), bad, **failed_marker)
            lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
            hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(DATASET_NAMES.get(dataset, dataset))
            ax.set_xlabel("paper's best-epoch top-1 (%)")
            ax.set_ylabel("ours, best test epoch (%)")
        _title(fig, f"Ours vs the paper, both at the best test epoch; {NOT_LEARNED} (red) = did not learn",
               table, "best test epoch, as the paper")
        fig.savefig(png(outputs, "vs_paper"), format="png", dpi=100)
        plt.close(fig)


def write_kernels_plot(table: pd.DataFrame, outputs: OutputSet) -> None:
    """Accuracy against K (plots/kernels.png): per dataset a panel, per model (colour) and family
    (marker) the mean over seeds with its 95% t-interval; the unmasked model's mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    summary_ = kernel_summary(table)
    _, _, chosen = selection(table)
    datasets = list(dict.fromkeys(summary_["dataset"]))
    models = ordered(summary_["model"], MODEL_NAMES)
    families = list(dict.fromkeys(summary_["family"]))
    colours = dict(zip(models, sns.color_palette(n_colors=len(models))))
    markers = dict(zip(families, "os^Dv<>"))
    series = [(m, f) for m in models for f in families]
    fig, axes = _panels(len(datasets), width=6.0, height=4.0)
    for ax, dataset in zip(axes, datasets):
        here = summary_[summary_["dataset"] == dataset]
        for i, (model, family) in enumerate(series):
            s = here[(here["model"] == model) & (here["family"] == family)]
            if s.empty:
                continue
            # side by side, so the intervals of two models at one K do not hide each other
            x = s["kernels"] + (i - (len(series) - 1) / 2) * 0.15
            label = f"{MODEL_NAMES.get(model, model)} {mask_label(family)[0]}"
            ax.errorbar(x, s["mean"], yerr=s["half_width"].fillna(0), fmt=f"-{markers[family]}",
                        color=colours[model], capsize=3, label=label)
            for xi, (_, row) in zip(x, s.iterrows()):
                note = f"n={row['n']}" + (f", {NOT_LEARNED}{row['not_learned']}" if row["not_learned"] else "")
                ax.annotate(note, (xi, row["mean"]), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=6, color="dimgrey")
        for model in models:
            baseline = here.loc[here["model"] == model, "none_mean"].dropna()
            if len(baseline):
                ax.axhline(baseline.iloc[0], color=colours[model], linestyle="--", linewidth=1,
                           label=f"{MODEL_NAMES.get(model, model)} unmasked (mean)")
        ks = sorted(here["kernels"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (Gaussians per head)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(DATASET_NAMES.get(dataset, dataset))
        ax.legend(fontsize=7, loc="best")
    _title(fig, f"Test top-1 against K: mean over seeds and {CONFIDENCE:.0%} t-interval (no bar: one "
           "seed); a bare family spec counts at its recipe's mask_kernels", table, chosen)
    fig.savefig(png(outputs, KERNELS_PLOT), format="png", dpi=100)
    plt.close(fig)
