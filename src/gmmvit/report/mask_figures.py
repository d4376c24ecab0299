"""The figures of what the masks learned: each masked model's layers rebuilt from a cell's saved
mask parameters, drawn against patch distance and around the centre patch."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .files import OutputSet, ReportError, os_error
from .names import NOT_LEARNED, row_label
from .plots import PLOTS_DIR, placeholder_figure
from .records import RETRAIN, read_json
from .stats import recipe_kernels

if TYPE_CHECKING:  # the tables need no torch; only the mask figures import it, when drawn
    from ..masks import LocalityMask


MASK_FIGURES = "masks"  # plots/masks/<model>-<mask>.png, one per masked model x mask spec
# Each figure is drawn from the mask modules themselves: the cell's model is built as train.py
# built it and the saved parameters are loaded into it by name, so the figure shows what the
# trained model computes, with no formula restated here. This is the one part of the report that
# needs torch and the package's models and masks; it needs no extra workflow input, because a
# change to a model or mask module retrains its cells, and a retrained cell reruns the report.


def rebuild_masks(record: dict, saved: dict) -> list[tuple[str, LocalityMask]]:
    """The masked layers (module name, mask) of the cell ``record`` describes, holding the saved
    parameters ``saved`` (mask_params.pt: "<module name>.<parameter>" -> tensor)."""
    from ..masks import LocalityMask, mask_options
    from ..models import build_model

    kernels = recipe_kernels(record.get("recipe_config"))
    model = build_model(record["model"], mask=record["mask"], img_size=int(record["img_size"]),
                        num_classes=int(record["num_classes"]),
                        mask_kwargs=mask_options(record["mask"], default_kernels=kernels))
    masks = [(name, module) for name, module in model.named_modules() if isinstance(module, LocalityMask)]
    expected = {f"{name}.{p}": tuple(value.shape) for name, module in masks
                for p, value in module.named_parameters()}
    misfit = sorted(k for k in set(expected) & set(saved) if tuple(saved[k].shape) != expected[k])
    if set(saved) != set(expected) or misfit:
        raise ReportError(
            f"mask_params.pt does not fit {record['model']} with mask {record['mask']}: missing "
            f"{sorted(set(expected) - set(saved))[:4]}, unexpected {sorted(set(saved) - set(expected))[:4]}, "
            "other shapes: " + (", ".join(f"{k} {tuple(saved[k].shape)} != {expected[k]}" for k in misfit[:2])
                                or "none") + f"; {RETRAIN}")
    model.load_state_dict(saved, strict=False)  # strict=False: everything but the masks is not saved
    return masks


def mask_values(mask) -> np.ndarray:
    """The layer's mask as its module computes it, float64, (heads or 1, N, N), or (heads, 1, 1)
    for a per-head factor that does not depend on the token pair (a temperature)."""
    import torch

    with torch.no_grad():
        return mask().double().cpu().numpy()


def is_per_head_constant(values: np.ndarray) -> bool:
    return values.shape[-2:] == (1, 1)


def mask_by_distance(mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distances, mean, low, high): the layer's mask over its patch-token pairs grouped by their
    Euclidean distance in patches. ``distances`` are those that occur on the layer's grid,
    ascending; ``mean``, ``low`` and ``high`` are (heads or 1, distances): the mean, min and max of
    the mask over the pairs at that distance. For a mask of the distance alone (GMM, ALiBi) the
    three are equal; ELM's learned matrix and RMT's Manhattan decay spread around the mean."""
    from ..masks import grid_offsets

    values = mask_values(mask)
    n = mask.num_tokens
    values = np.broadcast_to(values, (values.shape[0], n, n))
    dy, dx = (o.numpy() for o in grid_offsets(mask.grid))
    d2 = dy**2 + dx**2  # integers: pairs at one distance group exactly
    levels = np.unique(d2)
    groups = [values[:, d2 == level] for level in levels]
    return (np.sqrt(levels.astype(float)), np.stack([g.mean(1) for g in groups], 1),
            np.stack([g.min(1) for g in groups], 1), np.stack([g.max(1) for g in groups], 1))


def mask_around_centre(mask) -> np.ndarray:
    """(heads or 1, grid, grid): the mask of the centre patch's query over every key patch."""
    values = mask_values(mask)
    grid, n = mask.grid, mask.num_tokens
    values = np.broadcast_to(values, (values.shape[0], n, n))
    centre = (grid // 2) * grid + grid // 2
    return values[:, centre, :].reshape(-1, grid, grid)


def _short_layer(name: str) -> str:
    """blocks.3.attn.mask -> blocks.3; layers.2.blocks.1.attn.mask -> layers.2.blocks.1."""
    return re.sub(r"\.attn\.mask$|\.mask$", "", name)


def _value_meaning(mask) -> str:
    return {"mul": "factor on the scaled logits", "add": "bias added to the logits",
            "mix": "positional attention P (gated in)"}[mask.combine]


def write_mask_figure(metrics: Path, path: Path) -> None:
    """One figure (PNG, at ``path``) of what a cell's masks learned, from the mask_params.pt beside
    its record: per masked layer the mask against patch distance, one line per head (a band: its min-max
    over the pairs at that distance), or for a per-head temperature a bar per head; and a heat
    map of the mask around the centre patch for the first and last masked layer, per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    record = read_json(Path(metrics), RETRAIN)
    params = Path(metrics).with_name("mask_params.pt")
    what = f"{row_label(record['model'], record['mask'])}, {record['dataset']}, seed {record['seed']}"
    if not params.is_file():
        placeholder_figure(path, f"{what}: no mask_params.pt beside {metrics} (written by older code?)")
        return
    try:
        saved = torch.load(params, map_location="cpu", weights_only=True)
    except OSError as err:
        raise os_error(err, "read", params) from err
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # a truncated or foreign file
        raise ReportError(f"{params}: not a file of saved tensors ({str(err).splitlines()[0]}); "
                          f"{RETRAIN}") from err
    masks = rebuild_masks(record, saved)
    constant = is_per_head_constant(mask_values(masks[0][1]))
    cols = min(6, len(masks))
    rows = math.ceil(len(masks) / cols)
    shown = [] if constant else list(dict.fromkeys([0, len(masks) - 1]))  # first and last layer
    heat_cols = 12
    heat_rows = [math.ceil(mask_around_centre(masks[i][1]).shape[0] / heat_cols) for i in shown]
    top_height, heat_height = 2.3 * rows, [1.35 * r + 0.5 for r in heat_rows]
    fig = plt.figure(figsize=(max(2.9 * cols, 1.3 * heat_cols), top_height + sum(heat_height) + 1.2),
                     layout="constrained")  # lays out the subfigures' titles, labels and colour bars
    parts = fig.subfigures(1 + len(shown), 1, height_ratios=[top_height, *heat_height], squeeze=False)[:, 0]

    axes = parts[0].subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(masks):]:
        ax.set_visible(False)
    for ax, (name, mask) in zip(axes, masks):
        title = f"{_short_layer(name)} ({mask.grid}x{mask.grid}, {mask.num_heads} heads)"
        if constant:
            factors = mask_values(mask).reshape(-1)
            ax.bar(np.arange(1, len(factors) + 1), factors, color="tab:blue")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel("head", fontsize=7)
            ax.set_ylabel("τ_h / s", fontsize=7)
            ax.tick_params(labelsize=7)
            blocked = mask.blocked() is not None
            ax.set_title(title + ("\nown-token logit blocked" if blocked else ""), fontsize=7)
            continue
        distances, mean, low, high = mask_by_distance(mask)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(mean)))
        for head, colour in enumerate(colours):
            ax.plot(distances, mean[head], color=colour, linewidth=1.2)
            if np.any(high[head] > low[head]):
                ax.fill_between(distances, low[head], high[head], color=colour, alpha=0.15, linewidth=0)
        ax.set_title(title + (", shared by heads" if len(mean) < mask.num_heads else ""), fontsize=7)
        ax.set_xlabel("patch distance", fontsize=7)
        ax.set_ylabel(_value_meaning(mask), fontsize=7)
        ax.tick_params(labelsize=7)

    for part, index in zip(parts[1:], shown):
        name, mask = masks[index]
        maps = mask_around_centre(mask)
        heads = len(maps)
        grid_axes = part.subplots(math.ceil(heads / heat_cols), min(heads, heat_cols), squeeze=False).flatten()
        low, high = maps.min(), maps.max()
        for ax in grid_axes[heads:]:
            ax.set_visible(False)
        for head, ax in enumerate(grid_axes[:heads]):
            image = ax.imshow(maps[head], cmap="viridis", vmin=low, vmax=high)
            ax.plot(mask.grid // 2, mask.grid // 2, marker="+", color="red", markersize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("shared by heads" if heads < mask.num_heads else f"head {head + 1}", fontsize=7)
        part.colorbar(image, ax=list(grid_axes[:heads]), shrink=0.8)
        part.suptitle(f"{'first' if index == 0 else 'last'} masked layer, {_short_layer(name)}: the "
                      f"mask of the centre patch (+) over the {mask.grid}x{mask.grid} patches "
                      f"({_value_meaning(mask)})", fontsize=9)

    learned = "" if record.get("learned", True) else f"; {NOT_LEARNED} this cell did not learn"
    if constant:
        how = ("a per-head temperature τ_h relative to the layer's logit scale s, per layer "
               "(1 = the unmasked attention); it does not depend on the patch pair, so no heat map")
    else:
        how = ("top: the mask against patch distance, per layer, one line per head (dark: head 1, "
               "light: the last; band: min-max over the pairs at that distance); below: around the "
               "centre patch")
    import textwrap

    lines = textwrap.wrap(f"What the mask learned: {what} (recipe {record['recipe']}){learned}. {how}",
                          width=int(fig.get_figwidth() * 14))
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def mask_figure_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cell each mask figure shows: per model x masked spec, the first of its cells in the
    table's order (its first dataset, lowest seed: seed 0 of a grid that has it)."""
    masked = table[table["mask"] != "none"]
    return masked.drop_duplicates(["model", "mask"], keep="first")


def write_mask_figures(table: pd.DataFrame, outputs: OutputSet) -> list[str]:
    """plots/masks/<model>-<mask>.png for each of mask_figure_cells, into ``outputs``; their names."""
    written = []
    for _, cell in mask_figure_cells(table).iterrows():
        name = f"{PLOTS_DIR}/{MASK_FIGURES}/{cell['model']}-{cell['mask']}.png"
        write_mask_figure(Path(cell["metrics"]), outputs.temp_path(name))
        written.append(name)
    return written
