"""Brute-force float64 k-NN over a provably sufficient box of lattice images.

Used only by tests and benchmarks as ground truth for cryknn.featurize.
"""

import itertools

import numpy as np


def brute_force_knn(lattice, frac, k, queries=None, vectors=False):
    """k smallest distances from every motif atom to all other periodic points.

    Args:
      lattice: (3, 3) rows are cell vectors.
      frac: (N, 3) fractional coordinates.
      k: neighbours per atom.
      queries: optional motif indices to answer for (default: all atoms).
      vectors: also return each neighbour's displacement vector.
    Returns:
      distances (N or len(queries), k) float64 ascending, neighbour motif indices (N, k),
      and with vectors=True the displacements (N, k, 3) float64 (neighbour image minus
      query atom, angstrom, in the lattice's frame).

    With frac wrapped into [0, 1), a point within distance d of atom i differs
    from it by a translation |t_a| <= ceil(d / h_a) + 1 along axis a (h_a the
    interplanar spacing). The box grows until it covers the largest k-th
    distance found, so the answer is exact.
    """
    lattice = np.asarray(lattice, np.float64)
    frac = np.asarray(frac, np.float64) % 1.0
    n = len(frac)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=0)
    cart = frac @ lattice
    queries = np.arange(n) if queries is None else np.asarray(queries)
    reach = np.ones(3, int)
    while True:
        shifts = np.array(list(itertools.product(*[np.arange(-r, r + 1) for r in reach])))
        points = (cart[None] + (shifts @ lattice)[:, None]).reshape(-1, 3)
        owner = np.tile(np.arange(n), len(shifts))
        at_origin = np.repeat(np.all(shifts == 0, axis=1), n)
        displacement = points[None] - cart[queries, None, :]
        dist = np.linalg.norm(displacement, axis=-1)
        dist[(queries[:, None] == owner[None]) & at_origin[None]] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        kth = np.take_along_axis(dist, order, 1)
        if not np.isfinite(kth.max()):
            reach *= 2
            continue
        needed = np.ceil(kth.max() / spacing).astype(int) + 1
        if np.all(reach >= needed):
            if vectors:
                return kth, owner[order], np.take_along_axis(displacement, order[..., None], 1)
            return kth, owner[order]
        reach = np.maximum(reach, needed)


def cell_from_parameters(a, b, c, alpha, beta, gamma):
    """(3, 3) lattice rows from lengths (angstrom) and angles (degrees)."""
    al, be, ga = np.radians([alpha, beta, gamma])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz2 = c * c - cx * cx - cy * cy
    if cz2 <= 0:
        raise ValueError("angles do not form a cell")
    return np.array([[a, 0, 0], [b * np.cos(ga), b * np.sin(ga), 0], [cx, cy, np.sqrt(cz2)]])
