"""The unit cell of a data block, and the close atom pairs in it (minimum image).

One close-pair search serves the reader's symmetry merge, disorder resolution and
duplicate merge. It is not the featuriser's search (`cryknn.neighbours`), which answers
another question: the k nearest neighbours over every lattice image (exact beyond the
minimum image), jit-compiled in JAX. The reader needs every pair under a cutoff below half
the smallest interplanar spacing (the minimum image suffices) and no bound on how many (a
pile of coincident copies can exceed any k), on the host without importing JAX; the
training's coincident-site grouping (`features.table_sites`) reads the k-NN rows the
featuriser already computed. Both share `geometry.interplanar_spacings` and `geometry.wrap`.
"""

from __future__ import annotations

import itertools
import math

import gemmi
import numpy as np
from gemmi import cif

from cryknn import geometry
from cryknn.cif.values import BlockSkip

_CELL_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
              "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")


CELL_LENGTH_RANGE = geometry.CELL_LENGTH_RANGE


def unit_cell(block) -> tuple[np.ndarray, gemmi.UnitCell]:
    """(3, 3) lattice with rows a, b, c in angstrom (cart = frac @ lattice), and the cell."""
    raw = [block.find_value(tag) for tag in _CELL_TAGS]
    missing = [tag for tag, value in zip(_CELL_TAGS, raw) if value is None]
    if len(missing) == 6:
        raise BlockSkip("no unit cell (no _cell_length_* / _cell_angle_* items)")
    if missing:
        raise BlockSkip(f"incomplete unit cell: missing {', '.join(missing)}")
    params = []
    for tag, value in zip(_CELL_TAGS, raw):
        number = cif.as_number(cif.as_string(value))
        if not math.isfinite(number):
            raise BlockSkip(f"unit cell {tag} is not a number ({value!r})")
        params.append(number)
    for tag, length in zip(_CELL_TAGS[:3], params[:3]):
        if length <= 0:
            raise BlockSkip(f"non-positive cell length {tag} = {length:g}")
        if not CELL_LENGTH_RANGE[0] <= length <= CELL_LENGTH_RANGE[1]:
            raise BlockSkip(f"cell length {tag} = {length:g} A outside "
                            f"{CELL_LENGTH_RANGE[0]:g} .. {CELL_LENGTH_RANGE[1]:g} A (float32 "
                            f"distances would underflow to 0 or overflow)")
    for tag, angle in zip(_CELL_TAGS[3:], params[3:]):
        if not 0 < angle < 180:
            raise BlockSkip(f"cell angle {tag} = {angle:g} outside (0, 180)")
    cell = gemmi.UnitCell(*params)
    volume = cell.volume
    a, b, c = params[:3]
    if not (math.isfinite(volume) and volume > 1e-6 * a * b * c):
        raise BlockSkip(
            "cell angles {:g}, {:g}, {:g} give no positive volume".format(*params[3:]))
    lattice = np.array(cell.orth.mat, dtype=np.float64).T
    return lattice, cell


def _pair_distances_sq(x: np.ndarray, y: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Squared minimum-image distances between fractional points (..., 3) and (..., 3).

    Rounding the fractional difference finds the nearest image for every pair closer
    than half the smallest interplanar spacing, which is all the callers ask about.
    """
    d = x - y
    d -= np.rint(d)
    cart = d @ lattice
    return np.einsum("...i,...i->...", cart, cart)


def subset(keep: np.ndarray, i: np.ndarray, j: np.ndarray, d2: np.ndarray):
    """Pairs (i, j, d2) among the atoms in keep (N,), renumbered to the kept atoms."""
    new_index = np.cumsum(keep) - 1
    both = keep[i] & keep[j]
    return new_index[i[both]], new_index[j[both]], d2[both]


# Pairs the close-pair search compares at most (~100 bytes each); real cells of a million
# atoms need ~10^7. Only piles of coincident atoms reach it (the search is quadratic in the
# atoms of one place).
MAX_PAIR_CANDIDATES = 2**24


def _crowded_reason(crowd: int, cutoff: float, total: int) -> str:
    return (f"coincident sites: up to {crowd} atoms within {cutoff:g} A of one place; "
            f"resolving them would compare {total} pairs (limit {MAX_PAIR_CANDIDATES})")


def close_pairs(frac: np.ndarray, lattice: np.ndarray, cutoff: float,
                spacing: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of atoms closer than cutoff (minimum image), by a cell list.

    Args:
      frac: (N, 3) fractional coordinates in [0, 1).
      lattice: (3, 3) rows are cell vectors.
      cutoff: angstrom, below half the smallest interplanar spacing.
      spacing: (3,) interplanar spacings of the lattice, if already known.
    Returns:
      i, j (P,) int64 with i < j, and d2 (P,) squared distances, sorted by (i, j).
    """
    # Not shared with the featuriser's k-NN (`cryknn.neighbours`): this needs every pair under
    # a cutoff however many (piles of copies exceed any k), before a Structure exists, no JAX.
    n = frac.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if n < 2 or cutoff <= 0:
        return empty, empty, np.zeros(0)
    if spacing is None:
        spacing = geometry.interplanar_spacings(lattice)
    # Bins at least cutoff wide (in interplanar terms), so a close pair lies in the same
    # or adjacent bins; no more bins than about 2 per atom, so a dense table is cheap.
    bins = np.maximum(np.floor(spacing / cutoff), 1.0)
    excess = np.prod(bins) / max(2 * n, 27)
    if excess > 1:
        bins = np.maximum(np.floor(bins / excess ** (1 / 3)), 1.0)
    bins = bins.astype(np.int64)
    cell = np.minimum((frac * bins).astype(np.int64), bins - 1)  # (N, 3)
    strides = np.array([bins[1] * bins[2], bins[2], 1], dtype=np.int64)
    key = cell @ strides
    order = np.argsort(key, kind="stable")
    bin_count = np.bincount(key, minlength=int(np.prod(bins)))
    bin_start = np.cumsum(bin_count) - bin_count
    if np.all(bins >= 3):
        # Half shell: the own bin (pairs i < j) and 13 forward neighbours (all pairs).
        shell = np.array([o for o in itertools.product((-1, 0, 1), repeat=3)
                          if o > (0, 0, 0)] + [(0, 0, 0)], dtype=np.int64)
    else:
        # Few bins: every distinct neighbour bin (offsets modulo bins), pairs i < j.
        axis = [np.unique(np.array([-1, 0, 1]) % b) for b in bins.tolist()]
        shell = np.array(list(itertools.product(*axis)), dtype=np.int64)
    neighbour = ((cell[:, None, :] + shell[None, :, :]) % bins) @ strides  # (N, K)
    count = bin_count[neighbour].ravel()
    start = bin_start[neighbour].ravel()
    total = int(count.sum())
    if total > MAX_PAIR_CANDIDATES:
        raise BlockSkip(_crowded_reason(int(bin_count.max()), cutoff, total))
    i = np.repeat(np.repeat(np.arange(n), shell.shape[0]), count)
    j = order[np.repeat(start - np.cumsum(count) + count, count) + np.arange(total)]
    if np.all(bins >= 3):
        own = np.repeat(np.tile(np.all(shell == 0, axis=1), n), count)
        pick = ~own | (i < j)
    else:
        pick = i < j
    i, j = i[pick], j[pick]
    swap = i > j
    i, j = np.where(swap, j, i), np.where(swap, i, j)
    d2 = _pair_distances_sq(frac[i], frac[j], lattice)
    close = np.flatnonzero(d2 < cutoff * cutoff)
    close = close[np.lexsort((j[close], i[close]))]
    return i[close], j[close], d2[close]

