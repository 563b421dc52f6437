"""Which elements are confused with which, per k, from the k sweep's workdirs.

Each sweep run wrote metrics.json, which holds the test confusion matrix (counts, element
order), and misclassifications.csv (every wrongly predicted test atom: structure id, site
label, true and predicted element, probability), which gives the examples. Seeds are summed.

    python experiments/confusions.py [--name=core_mof] [--workroot=/tmp/cryknn_experiments/k_sweep]
        [--top=8] [--examples=3] [--max_k=10]

Writes <workroot>/<name>/confusions.md (most confused pairs per k with the most confident
wrong sites as examples) and docs/figures/confusions_<name>.png (row-normalised confusion
matrices for k = 1..max_k, the change from the smallest to the largest k, and per-element
recall against k).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from cryknn.evaluate import most_confused_pairs as top_pairs  # noqa: E402


def read_misclassifications(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["probability"] = float(r["probability"])
    return rows


def stored_confusion(metrics: dict, symbols: Sequence[str]) -> np.ndarray:
    """(C, C) int64 [true, predicted] test confusion matrix stored in a run's metrics.json."""
    stored = metrics["test"]["confusion_matrix"]
    if list(stored["elements"]) != list(symbols):
        raise ValueError("the stored confusion matrix has another element order")
    return np.asarray(stored["counts"], np.int64)


def row_normalise(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def examples(rows: Sequence[dict], true: str, predicted: str, n: int) -> list[dict]:
    """The n most confident wrong predictions of true as predicted (distinct structures)."""
    hits = sorted((r for r in rows if r["true_element"] == true
                   and r["predicted_element"] == predicted),
                  key=lambda r: -r["probability"])
    out, seen = [], set()
    for r in hits:
        if r["structure_id"] in seen:
            continue
        seen.add(r["structure_id"])
        out.append(r)
        if len(out) == n:
            break
    return out


def collect(root: Path, max_k: int | None = None) -> dict[int, dict]:
    """k -> {'symbols', 'cm' (summed over seeds), 'rows' (seed 0's, or the first seed's)}."""
    runs: dict[int, list[Path]] = {}
    for d in sorted(root.glob("k*_s*")):
        m = re.fullmatch(r"k(\d+)_s(\d+)", d.name)
        if m and (d / "metrics.json").exists() and (d / "misclassifications.csv").exists():
            runs.setdefault(int(m.group(1)), []).append(d)
    out = {}
    for k in sorted(runs):
        if max_k is not None and k > max_k:
            continue
        total, symbols, first_rows = None, None, None
        for d in sorted(runs[k], key=lambda p: int(p.name.split("_s")[1])):
            metrics = common.load_json(d / "metrics.json")
            syms = list(metrics["elements"])
            if symbols is None:
                symbols = syms
            elif syms != symbols:
                raise ValueError(f"{d}: elements differ from the other seeds of k={k}")
            rows = read_misclassifications(d / "misclassifications.csv")
            cm = stored_confusion(metrics, symbols)
            total = cm if total is None else total + cm
            if first_rows is None:
                first_rows = rows
        out[k] = {"symbols": symbols, "cm": total, "rows": first_rows, "seeds": len(runs[k])}
    return out


def report(data: dict[int, dict], top: int, n_examples: int) -> str:
    parts = []
    for k, d in data.items():
        pairs = top_pairs(d["cm"], d["symbols"], top)
        lines = [f"#### k = {k} ({d['seeds']} seeds; examples from the first seed)", "",
                 "| true | predicted | atoms per run | share of true | most confident examples "
                 "(structure id, site, p) |", "|---|---|---|---|---|"]
        for pair in pairs:
            ex = examples(d["rows"], pair["true"], pair["predicted"], n_examples)
            ex_text = "; ".join(f"`{e['structure_id']}` {e['site_label']} ({e['probability']:.2f})"
                                for e in ex)
            lines.append(f"| {pair['true']} | {pair['predicted']} | "
                         f"{pair['count'] / d['seeds']:.0f} | "
                         f"{pair['fraction_of_true']:.3f} | {ex_text} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(data: dict[int, dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(data)
    symbols = data[ks[0]]["symbols"]
    n_panels = len(ks) + 2
    cols = 4
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.9 * rows), squeeze=False)
    axes = axes.ravel()
    n = len(symbols)
    for ax, k in zip(axes, ks):
        if data[k]["symbols"] != symbols:
            raise ValueError("element lists differ between k; rerun the sweep with --elements")
        norm = row_normalise(data[k]["cm"])
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        bal = np.mean(np.diag(norm)[data[k]["cm"].sum(axis=1) > 0])
        ax.set_title(f"k = {k} (balanced acc. {bal:.3f})", fontsize=10)
        ax.set_xticks(range(n), symbols, fontsize=6, rotation=90)
        ax.set_yticks(range(n), symbols, fontsize=6)
    ax = axes[len(ks)]
    diff = row_normalise(data[ks[-1]]["cm"]) - row_normalise(data[ks[0]]["cm"])
    lim = max(np.abs(diff).max(), 1e-6)
    im = ax.imshow(diff, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_title(f"k = {ks[-1]} minus k = {ks[0]} (blue: more)", fontsize=10)
    ax.set_xticks(range(n), symbols, fontsize=6, rotation=90)
    ax.set_yticks(range(n), symbols, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[len(ks) + 1]
    recall = np.array([np.diag(row_normalise(data[k]["cm"])) for k in ks])  # (K, C)
    order = np.argsort(-data[ks[0]]["cm"].sum(axis=1))
    present = data[ks[0]]["cm"].sum(axis=1) > 0
    for j, c in enumerate(c for c in order if present[c]):  # no test atoms: no recall
        ax.plot(ks, recall[:, c], "o-" if j < 10 else ".--", ms=3, lw=1,
                label=symbols[c], color=plt.cm.tab20(j % 20))
    ax.set_xlabel("k")
    ax.set_ylabel("test recall")
    ax.set_title("per-element recall against k", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    for ax in axes[n_panels:]:
        ax.axis("off")
    fig.suptitle(title + " (rows: true element, columns: predicted; row-normalised)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("name", "core_mof", "The k sweep's --name.")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "k_sweep"), "The k sweep's --workroot.")
    flags.DEFINE_integer("top", 8, "Most confused pairs listed per k.")
    flags.DEFINE_integer("examples", 3, "Example sites per pair.")
    flags.DEFINE_integer("max_k", 10, "Largest k shown.")
    flags.DEFINE_string("out_dir", str(common.FIGURES), "Figures go here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    root = Path(FLAGS.workroot) / FLAGS.name
    data = collect(root, FLAGS.max_k)
    if not data:
        print(f"no finished k-sweep runs under {root}", file=sys.stderr)
        return 1
    md = report(data, FLAGS.top, FLAGS.examples)
    (root / "confusions.md").write_text(md)
    fig = Path(FLAGS.out_dir) / f"confusions_{FLAGS.name}.png"
    plot(data, f"{FLAGS.name}: test confusion matrices, k = {min(data)}..{max(data)}", fig)
    print(md)
    print(f"wrote {root}/confusions.md, {fig}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/confusions.py",
                     define_flags=define_flags)
