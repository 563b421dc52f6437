"""Lattice geometry both the reader and the featuriser need (numpy only, a leaf module)."""

from __future__ import annotations

import numpy as np


def interplanar_spacings(lattices: np.ndarray) -> np.ndarray:
    """(..., 3) distances between the lattice planes parallel to (b, c), (c, a), (a, b).

    lattices: (..., 3, 3) float, rows are the cell vectors. h_a = 1 / |column a of the
    inverse|: a Cartesian vector v has fractional coordinate |u_a| <= |v| / h_a.
    """
    inverse = np.linalg.inv(np.asarray(lattices, np.float64))
    return 1.0 / np.linalg.norm(inverse, axis=-2)
