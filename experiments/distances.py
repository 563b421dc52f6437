"""Nearest-neighbour distance distributions per (centre element, neighbour element) pair.

For every atom we take its exact periodic k-NN (cryknn.neighbours, k=5 by default) and the
element of each neighbour (`Neighbours.indices` into the motif). For each neighbour rank
r = 1..k and each pair (centre element, element of the r-th neighbour) we histogram the
r-th distance, and write a table of counts, median, mode and 5-95% range with the sum of
covalent radii (Cordero et al. 2008) beside it. Metals are pooled as "M" for the M-O,
M-N, O-M, N-M panels (the table also lists each metal separately).

    python experiments/distances.py [--sources=core_mof,cod] [--limit=2000] [--k=5]
        [--cod_dir=../shared/data/cod] [--out_dir=docs/figures]
        [--table_dir=/tmp/cryknn_experiments/distances]

Outputs, per source S (core_mof: the first --limit readable structures of the embedded
CoRE MOF 2019-ASR archive; cod: every readable structure of the shared COD folder, skipped
with a note when the folder is absent):
  <out_dir>/distances_S_rank<r>.png   16 panels: the common pairs and the pooled distribution
  <out_dir>/distances_S_pooled.png    pooled distance of ranks 1..k; rank-1 by centre element
  <table_dir>/distances_S.csv         every pair with >= --min_count atoms, all ranks
  <table_dir>/distances_S.md          the plotted pairs, ranks 1..k, as markdown
  <table_dir>/distances_S.json        summary (counts, skips, overlap fraction, timings)
and, when both sources ran, <out_dir>/distances_compare_rank1.png (both densities per pair).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Panels of the per-rank figures: (centre, neighbour) with "M" = any metal; "*" = pooled.
PANEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("C", "C"), ("C", "H"), ("C", "O"), ("C", "N"),
    ("H", "C"), ("H", "N"), ("H", "O"), ("N", "C"),
    ("N", "H"), ("N", "M"), ("O", "C"), ("O", "H"),
    ("O", "M"), ("M", "O"), ("M", "N"), ("*", "*"),
)
BIN_WIDTH = 0.02  # angstrom
MAX_DISTANCE = 5.0  # histogram range [0, MAX_DISTANCE)
MODE_BIN = 0.01  # angstrom, resolution of the reported mode
OVERLAP = 0.5  # angstrom: first-neighbour distances below this are overlapping sites


# ----------------------------------------------------------------------------
# Pure functions (tested in tests/test_experiments.py).


def neighbour_arrays(structures: Sequence, neighbours: Sequence
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-structure k-NN into atom arrays.

    Returns centre (A,) int32 atomic numbers, neighbour (A, k) int32 atomic numbers of the
    k nearest neighbours, distance (A, k) float32 ascending.
    """
    centre = [np.asarray(s.numbers, np.int32) for s in structures]
    neigh = [np.asarray(s.numbers, np.int32)[n.indices] for s, n in zip(structures, neighbours)]
    dist = [np.asarray(n.distances, np.float32) for n in neighbours]
    k = dist[0].shape[1] if dist else 1
    if not centre:
        return (np.zeros(0, np.int32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    return np.concatenate(centre), np.concatenate(neigh), np.concatenate(dist)


def pair_mask(centre_sym: np.ndarray, neigh_sym: np.ndarray, pair: tuple[str, str]
              ) -> np.ndarray:
    """(A,) bool: atoms whose centre/neighbour symbols match pair ("M": any metal, "*": any)."""
    def match(sym: np.ndarray, want: str) -> np.ndarray:
        if want == "*":
            return np.ones(sym.shape, bool)
        if want == common.METAL:
            return np.isin(sym, common.METAL_SYMBOLS)
        return sym == want

    return match(centre_sym, pair[0]) & match(neigh_sym, pair[1])


def mode_of(values: np.ndarray, bin_width: float = MODE_BIN) -> float:
    """Centre of the most populated bin of width bin_width (nan for no values)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan")
    idx = np.floor(values / bin_width).astype(np.int64)
    lo = idx.min()
    return float((lo + np.argmax(np.bincount(idx - lo)) + 0.5) * bin_width)


def summarize(values: np.ndarray) -> dict:
    """count, median, mode, 5th/95th percentiles of 1-D distances."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"count": 0, "median": float("nan"), "mode": float("nan"),
                "p05": float("nan"), "p95": float("nan")}
    p05, med, p95 = np.percentile(values, [5, 50, 95])
    return {"count": int(values.size), "median": float(med), "mode": mode_of(values),
            "p05": float(p05), "p95": float(p95)}


def pair_rows(centre: np.ndarray, neigh: np.ndarray, dist: np.ndarray, *,
              min_count: int = 1, grouped: bool = True) -> list[dict]:
    """Table rows for every (rank, centre element, neighbour element) with >= min_count atoms,
    plus (grouped=True) rows with metals pooled as "M" on either side.

    centre (A,), neigh (A, k) atomic numbers; dist (A, k). Each row: rank (1-based), centre,
    neighbour, kind ('element' or 'group'), count, fraction (of the centre's atoms whose
    r-th neighbour is that element), median, mode, p05, p95, covalent_sum, median_minus_cov.
    """
    rows = []
    if centre.size == 0:
        return rows
    c_sym = common.symbols_of(centre)
    c_grp = common.group_symbols(c_sym)
    centre_totals = collections.Counter(c_sym.tolist())
    group_totals = collections.Counter(c_grp.tolist())
    for r in range(dist.shape[1]):
        n_sym = common.symbols_of(neigh[:, r])
        n_grp = common.group_symbols(n_sym)
        passes = [("element", c_sym, n_sym, centre_totals)]
        if grouped:
            passes.append(("group", c_grp, n_grp, group_totals))
        for kind, cs, ns, totals in passes:
            keys = np.char.add(np.char.add(cs, "|"), ns)
            uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for u, key in enumerate(uniq):
                a, b = key.split("|")
                if counts[u] < min_count:
                    continue
                if kind == "group" and common.METAL not in (a, b):
                    continue  # identical to the element row
                values = dist[order[bounds[u]:bounds[u + 1]], r]
                row = {"rank": r + 1, "centre": a, "neighbour": b, "kind": kind,
                       **summarize(values)}
                row["fraction"] = row["count"] / totals[a]
                cov = common.covalent_sum(a, b)
                row["covalent_sum"] = cov
                row["median_minus_cov"] = None if cov is None else row["median"] - cov
                rows.append(row)
    rows.sort(key=lambda row: (row["rank"], -row["count"]))
    return rows


def histogram(values: np.ndarray, bin_width: float = BIN_WIDTH,
              max_distance: float = MAX_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) on [0, max_distance) with bins of bin_width (values beyond clipped out)."""
    edges = np.arange(0.0, max_distance + bin_width / 2, bin_width)
    counts, _ = np.histogram(np.asarray(values, np.float64), bins=edges)
    return counts, edges


def top_metals(centre_sym: np.ndarray, neigh_sym: np.ndarray, pair: tuple[str, str],
               n: int = 3) -> list[str]:
    """The n most frequent metals on the "M" side of pair among the matching atoms."""
    mask = pair_mask(centre_sym, neigh_sym, pair)
    side = centre_sym if pair[0] == common.METAL else neigh_sym
    return [s for s, _ in collections.Counter(side[mask].tolist()).most_common(n)]


# ----------------------------------------------------------------------------
# Figures.


def _label(pair: tuple[str, str]) -> str:
    return "all atoms (pooled)" if pair == ("*", "*") else f"{pair[0]}-{pair[1]}"


def _cov_lines(ax, pair, c_sym, n_sym) -> None:
    if "*" in pair:
        return
    if common.METAL in pair:
        other = pair[1] if pair[0] == common.METAL else pair[0]
        for i, metal in enumerate(top_metals(c_sym, n_sym, pair)):
            cov = common.covalent_sum(metal, other)
            if cov is not None:
                ax.axvline(cov, color=f"C{i + 1}", ls="--", lw=1, label=f"r({metal})+r({other})")
        return
    cov = common.covalent_sum(*pair)
    if cov is not None:
        ax.axvline(cov, color="C3", ls="--", lw=1, label="sum of covalent radii")


def plot_rank(c_sym, n_sym_r, dist_r, rank: int, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(16, 12))
    for ax, pair in zip(axes.ravel(), PANEL_PAIRS):
        mask = pair_mask(c_sym, n_sym_r, pair)
        values = dist_r[mask]
        counts, edges = histogram(values)
        ax.stairs(counts, edges, fill=True, alpha=0.6, color="C0")
        _cov_lines(ax, pair, c_sym, n_sym_r)
        s = summarize(values)
        ax.set_title(f"{_label(pair)}: n={s['count']:,}, median {common.fmt(s['median'], 2)} A",
                     fontsize=10)
        if s["count"]:
            lo = max(0.0, s["p05"] - 0.6)
            hi = min(MAX_DISTANCE, s["p95"] + 0.6)
            ax.set_xlim(lo, hi)
        else:
            ax.text(0.5, 0.5, "no such atoms", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_yticks([])
        ax.set_xlabel(f"distance to neighbour {rank} (A)", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{title}: distance to the {_ordinal(rank)} nearest neighbour by "
                 f"(centre, neighbour) element; M = any metal; dashed: covalent radii sums "
                 f"(Cordero 2008)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_pooled(c_sym, dist, title: str, path: Path, top: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5))
    for r in range(dist.shape[1]):
        counts, edges = histogram(dist[:, r])
        a1.stairs(counts / max(counts.sum(), 1) / BIN_WIDTH, edges, label=f"neighbour {r + 1}")
    a1.set_xlabel("distance (A)")
    a1.set_ylabel("density (1/A)")
    a1.set_title(f"{title}\nall atoms: distance to the r-th neighbour", fontsize=10)
    a1.legend()
    for sym, _ in collections.Counter(c_sym.tolist()).most_common(top):
        counts, edges = histogram(dist[c_sym == sym, 0])
        a2.stairs(counts / max(counts.sum(), 1) / BIN_WIDTH, edges, label=sym)
    a2.set_xlim(0.6, 3.0)
    a2.set_xlabel("distance to the nearest neighbour (A)")
    a2.set_ylabel("density (1/A)")
    a2.set_title(f"{title}\nnearest-neighbour distance by centre element", fontsize=10)
    a2.legend(ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_compare(data: dict, path: Path) -> None:
    """Rank-1 densities per panel pair, one line per source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(16, 12))
    for ax, pair in zip(axes.ravel(), PANEL_PAIRS):
        for i, (name, (c_sym, n_sym, dist)) in enumerate(data.items()):
            values = dist[pair_mask(c_sym, n_sym[:, 0], pair), 0]
            counts, edges = histogram(values)
            ax.stairs(counts / max(counts.sum(), 1) / BIN_WIDTH, edges, color=f"C{i}",
                      label=f"{name} (n={len(values):,})")
        cov = None if ("*" in pair or common.METAL in pair) else common.covalent_sum(*pair)
        if cov is not None:
            ax.axvline(cov, color="C3", ls="--", lw=1)
        ax.set_xlim(0.5, 3.5)
        if not any(pair_mask(c, n[:, 0], pair).any() for c, n, _ in data.values()):
            ax.text(0.5, 0.5, "no such atoms", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(_label(pair), fontsize=10)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("nearest-neighbour distance density per (centre, neighbour) pair: "
                 + " vs ".join(data) + "; dashed: covalent radii sum", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# ----------------------------------------------------------------------------
# Driver.


TABLE_COLUMNS = ("rank", "centre", "neighbour", "kind", "count", "fraction", "median", "mode",
                 "p05", "p95", "covalent_sum", "median_minus_cov")


def run_source(source: str, args) -> tuple | None:
    from cryknn import neighbours as neighbours_lib

    t0 = time.time()
    try:
        structures, skips = common.read_structures(
            source, args.limit if source == "core_mof" else args.cod_limit, args.cod_dir)
    except FileNotFoundError as e:
        print(f"{source}: skipped ({e})")
        return None
    t_read = time.time() - t0
    if not structures:
        print(f"{source}: no readable structures; skipped")
        return None
    t1 = time.time()
    neighbours = []
    for start in range(0, len(structures), 500):
        neighbours.extend(neighbours_lib.featurize(structures[start:start + 500], args.k))
    t_feat = time.time() - t1
    centre, neigh, dist = neighbour_arrays(structures, neighbours)
    c_sym, n_sym = common.symbols_of(centre), common.symbols_of(neigh)
    print(f"{source}: {len(structures)} structures ({len(skips)} skipped), {len(centre):,} atoms; "
          f"read {t_read:.0f} s, featurised k={args.k} in {t_feat:.0f} s", flush=True)

    title = {"core_mof": f"CoRE MOF 2019-ASR ({len(structures)} structures)",
             "cod": f"COD shared folder ({len(structures)} structures)"}[source]
    out_dir, table_dir = Path(args.out_dir), Path(args.table_dir)
    for r in range(args.k):
        plot_rank(c_sym, n_sym[:, r], dist[:, r], r + 1, title,
                  out_dir / f"distances_{source}_rank{r + 1}.png")
    plot_pooled(c_sym, dist, title, out_dir / f"distances_{source}_pooled.png")

    rows = pair_rows(centre, neigh, dist, min_count=args.min_count)
    common.write_csv(table_dir / f"distances_{source}.csv", rows, TABLE_COLUMNS)
    md = []
    for r in range(1, args.k + 1):
        panel = []
        for pair in PANEL_PAIRS[:-1]:
            kind = "group" if common.METAL in pair else "element"
            for row in rows:
                if (row["rank"], row["centre"], row["neighbour"], row["kind"]) == (r, *pair, kind):
                    panel.append(row)
        pooled = {"rank": r, "centre": "*", "neighbour": "*", "kind": "all",
                  **summarize(dist[:, r - 1])}
        md.append(f"### {title}: neighbour {r}\n\n" + common.markdown_table(
            panel + [pooled], ("centre", "neighbour", "count", "fraction", "median", "mode",
                               "p05", "p95", "covalent_sum", "median_minus_cov"),
            ("centre", "neighbour", "atoms", "share of centre's atoms", "median (A)",
             "mode (A)", "5% (A)", "95% (A)", "cov. sum (A)", "median - cov. (A)"), digits=3))
    (table_dir / f"distances_{source}.md").write_text("\n\n".join(md) + "\n")
    overlap = dist[:, 0] < OVERLAP
    summary = {
        "source": source, "structures": len(structures), "skipped": len(skips),
        "atoms": int(len(centre)), "k": args.k, "read_s": t_read, "featurize_s": t_feat,
        "overlap_threshold_A": OVERLAP, "overlap_atoms": int(overlap.sum()),
        "overlap_structures": int(len({s.id for s, n in zip(structures, neighbours)
                                       if (n.distances[:, 0] < OVERLAP).any()})),
        "top_centre_elements": collections.Counter(c_sym.tolist()).most_common(15),
    }
    common.write_json(table_dir / f"distances_{source}.json", summary)
    print(f"{source}: wrote {out_dir}/distances_{source}_*.png and "
          f"{table_dir}/distances_{source}.{{csv,md,json}}", flush=True)
    return c_sym, n_sym, dist


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", default="core_mof,cod",
                   help="comma list of core_mof (embedded archive) and cod (shared folder)")
    p.add_argument("--limit", type=int, default=2000,
                   help="core_mof: the first N readable structures of the archive")
    p.add_argument("--cod_limit", type=int, default=None, help="cod: at most N structures")
    p.add_argument("--cod_dir", default=str(common.DEFAULT_COD))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--min_count", type=int, default=20,
                   help="table rows only for pairs with at least this many atoms")
    p.add_argument("--out_dir", default=str(common.FIGURES))
    p.add_argument("--table_dir", default=str(common.SCRATCH / "distances"),
                   help="CSV, markdown and JSON tables (results.md embeds the markdown)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be at least 1")
    data = {}
    for source in [s.strip() for s in args.sources.split(",") if s.strip()]:
        if source not in ("core_mof", "cod"):
            p.error(f"unknown source {source!r}")
        result = run_source(source, args)
        if result is not None:
            data[source] = result
    if len(data) > 1:
        path = Path(args.out_dir) / "distances_compare_rank1.png"
        plot_compare(data, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
