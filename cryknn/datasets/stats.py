"""Element statistics of a built dataset as a text table and a bar chart."""

from __future__ import annotations

import numpy as np

from cryknn import elements as elements_lib
from cryknn import families
from cryknn import util


def top_elements(stats: dict, n: int, split: str = "train") -> list[str]:
    """The n element symbols with the most atoms in `split` of an element_stats() dict.

    Ties go to the lower atomic number (the order of element_stats.json).
    """
    table = stats["splits"].get(split, {}).get("elements", {})
    ranked = sorted(table, key=lambda e: (-table[e]["atoms"], elements_lib.atomic_number(e)))
    return ranked[:n]


def format_stats(stats: dict, top: int | None = None) -> str:
    """A text table: one row per element (most training atoms first), atoms/structures per split."""
    splits = [s for s in families.SPLITS if s in stats["splits"]]
    order = list(stats["splits"].get("train", {}).get("elements", {}))
    for s in splits:
        order += [e for e in stats["splits"][s]["elements"] if e not in order]
    if top:
        order = order[:top]
    columns = [(s, k) for s in splits for k in ("atoms", "structures")]
    widths = [max(12, len(f"{s} {k}") + 2) for s, k in columns]
    rows = [f"{'element':<8}" + "".join(f"{s + ' ' + k:>{w}}" for (s, k), w in zip(columns, widths))]
    for e in order:
        cells = [stats["splits"][s]["elements"].get(e, {}).get(k, 0) for s, k in columns]
        rows.append(f"{e:<8}" + "".join(f"{c:>{w}d}" for c, w in zip(cells, widths)))
    totals = [stats["splits"][s][k] for s, k in columns]
    rows.append(f"{'total':<8}" + "".join(f"{c:>{w}d}" for c, w in zip(totals, widths)))
    return "\n".join(rows)


def plot_stats(stats: dict, out: str, top: int = 40) -> None:
    """Bar chart PNG of atoms per element (log scale), one bar group per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in families.SPLITS if s in stats["splits"]]
    order = list(stats["splits"].get(splits[0], {}).get("elements", {}))[:top]
    x = np.arange(len(order))
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(order) + 2), 4.5))
    for i, s in enumerate(splits):
        table = stats["splits"][s]["elements"]
        ax.bar(x + (i - (len(splits) - 1) / 2) * width,
               [table.get(e, {}).get("atoms", 0) for e in order], width, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(order, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("atoms")
    ax.set_title(f"{stats.get('dataset', '')}: atoms per element")
    ax.legend()
    fig.tight_layout()
    with util.atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
