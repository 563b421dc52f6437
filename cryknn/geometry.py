"""Lattice geometry both the reader and the featuriser need (numpy only, a leaf module)."""

from __future__ import annotations

import numpy as np

# Cell lengths (angstrom) cryknn reads and featurises: float32 squared distances keep
# 1e-9 A apart from 0 and stay finite for 1e9 A cells (real cells: 2 .. 1000 A).
CELL_LENGTH_RANGE = (1e-9, 1e9)


def interplanar_spacings(lattices: np.ndarray) -> np.ndarray:
    """(..., 3) distances between the lattice planes parallel to (b, c), (c, a), (a, b).

    lattices: (..., 3, 3) float, rows are the cell vectors. h_a = 1 / |column a of the
    inverse|: a Cartesian vector v has fractional coordinate |u_a| <= |v| / h_a.
    """
    inverse = np.linalg.inv(np.asarray(lattices, np.float64))
    return 1.0 / np.linalg.norm(inverse, axis=-2)


def wrap(frac: np.ndarray) -> np.ndarray:
    """Fractional coordinates (..., 3) wrapped into [0, 1) (a new array)."""
    frac = frac - np.floor(frac)
    frac[frac >= 1.0] = 0.0  # -1e-17 - floor(-1e-17) rounds to 1.0
    return frac
