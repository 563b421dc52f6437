"""Exact periodic k-nearest-neighbour distances, jit-compiled and vmapped in JAX.

For every atom of a crystal (lattice + motif) we want the k smallest distances to
all *other* points of the infinite periodic set {p_j + t : t in the lattice}.

The search enumerates, for a radius r, every lattice image that can hold a point within
r of the atom (`knn_plan`'s docstring proves it), so an atom whose k-th distance found
is <= r is exact whatever other atoms do. Atoms with fewer than k points within r are
retried alone with a larger radius: the farthest of any k + 1 real candidate points is a
proven upper bound on the k-th distance, so a retry with it must succeed; the retry
radius is that bound capped at RETRY_GROWTH * r (a far bound must not blow up the
retry), so it grows geometrically until it passes the bound.

Layers, a module each:
  neighbours  (here) validation, passes, retry, results in caller order: `featurize_arrays`
  knn_plan    host, float64, vectorised over structures: radius, images, sort order,
              query blocks and their windows, candidate buckets: `plan` -> `Plan`
  knn_calls   a plan's blocks packed into padded `KnnBatch` device calls, their rows
              gathered back: `run_plan`
  knn_kernel  the device kernel (jit, a loop over groups of vmapped blocks): `knn_kernel`
Imports flow one way: neighbours -> knn_calls -> knn_plan and knn_kernel (neighbours also
uses knn_plan); knn_plan is numpy only and knn_kernel imports no cryknn module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import numpy as np

from cryknn import errors
from cryknn import geometry
from cryknn import knn_calls
from cryknn import knn_plan

if TYPE_CHECKING:  # the CIF reader (gemmi) is not needed to featurise arrays
    from cryknn import cif

# Largest radius growth per retry (3.4 times the volume); see _Results.collect.
RETRY_GROWTH = 1.5
# Neighbours per atom at most (memory grows with k; the research uses k <= 100).
MAX_K = 1024


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """k-NN of every atom of one structure.

    Attributes:
      distances: (N, k) float32, ascending, angstrom; the atom itself is excluded
        once, distinct sites that overlap it count (distance 0).
      indices: (N, k) int32 motif index of each neighbour (look up its element).
      radius: the radius (angstrom) under which the result was proven exact.
      vectors: (N, k, 3) float32 Cartesian displacement (angstrom, the lattice's own
        frame) from the atom to each neighbour's image: neighbour position minus atom
        position, from the same candidate as its distance and index (so |vector| ==
        distance up to float32 rounding, ties included).
    """

    distances: np.ndarray
    indices: np.ndarray
    radius: float
    vectors: np.ndarray


def validate_cell(lattice: np.ndarray, frac: np.ndarray) -> None:
    """Raise FeaturizeError for a singular lattice or non-finite coordinates."""
    lattice = np.asarray(lattice, np.float64)
    if lattice.shape != (3, 3) or not np.all(np.isfinite(lattice)):
        raise errors.FeaturizeError(f"lattice must be a finite 3x3 matrix, got {lattice!r}")
    volume = abs(np.linalg.det(lattice))
    if not volume > 1e-6 * np.prod(np.linalg.norm(lattice, axis=1)):
        raise errors.FeaturizeError(f"degenerate lattice (volume {volume:.3g} A^3)")
    frac = np.asarray(frac)
    if frac.ndim != 2 or frac.shape[1] != 3 or frac.shape[0] < 1:
        raise errors.FeaturizeError(f"positions must be (N>=1, 3), got shape {frac.shape}")
    if not np.all(np.isfinite(frac)):
        raise errors.FeaturizeError("positions contain NaN or infinite coordinates")
    lengths = np.linalg.norm(lattice, axis=1)
    low, high = geometry.CELL_LENGTH_RANGE
    if lengths.min() < low or lengths.max() > high:
        raise errors.FeaturizeError(f"cell lengths {lengths.min():.3g} .. {lengths.max():.3g} A "
                                    f"outside {low:g} .. {high:g} A: float32 distances would "
                                    f"underflow to 0 or overflow")


def split_featurizable(structures: Sequence[cif.Structure], k: int | None = None
                       ) -> tuple[list[cif.Structure], list[cif.Skip]]:
    """The structures whose cells can be featurised, and a Skip with the reason for each
    of the others (a degenerate lattice, non-finite coordinates; with `k`, a cell that
    needs too many lattice images for k neighbours)."""
    from cryknn import cif

    k = None if k is None else check_k(k)
    good, skips = [], []
    for s in structures:
        try:
            validate_cell(s.lattice, s.frac)
            good.append(s)
        except errors.FeaturizeError as e:
            skips.append(cif.Skip(s.source, s.id.split(":", 1)[-1], str(e)))
    if k is None or not good:
        return good, skips
    too_many = knn_plan.images_needed(np.stack([s.lattice for s in good]),
                                      [s.num_atoms for s in good], k
                                      ) > knn_plan.MAX_BLOCK_CANDIDATES
    for s in [s for s, bad in zip(good, too_many) if bad]:
        try:
            knn_plan.check_images(s.lattice, s.num_atoms, k)
        except errors.FeaturizeError as e:
            skips.append(cif.Skip(s.source, s.id.split(":", 1)[-1], str(e)))
    return [s for s, bad in zip(good, too_many) if not bad], skips


def check_k(k) -> int:
    """k as an int; FeaturizeError unless it is an integer in 1..MAX_K."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise errors.FeaturizeError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise errors.FeaturizeError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise errors.FeaturizeError(f"k = {k}: at most {MAX_K} neighbours per atom")
    return int(k)


def featurize_arrays(
    lattices: Sequence[np.ndarray],
    fracs: Sequence[np.ndarray],
    k: int,
    *,
    budget: int = knn_calls.DEFAULT_CALL_BUDGET,
    sharding: jax.sharding.NamedSharding | None = None,
    progress: Callable[[int], None] | None = None,
    failures: dict[int, str] | None = None,
) -> list[Neighbours | None]:
    """Exact k-NN for any list of cells; results in input order.

    Args:
      lattices: per structure (3, 3) rows are cell vectors (angstrom).
      fracs: per structure (N, 3) fractional positions.
      k: neighbours per atom (>= 1; may exceed the atoms per cell).
      budget: candidate triples per device call (memory bound).
      sharding: optional NamedSharding over a 1-D mesh; each call's blocks are
        split over its devices.
      progress: called with the number of atoms finished after each pass.
      failures: if given, a structure whose search outgrows the block limit on a retry
        (`knn_plan.oversized_structures`) is recorded here, {its index: the reason}, and
        left out (None in the result) instead of failing the whole call.
    Returns:
      One Neighbours per structure, each proven exact (None for each failure).
    """
    k = check_k(k)
    if len(lattices) != len(fracs):
        raise errors.FeaturizeError("lattices and fracs differ in length")
    for lattice, frac in zip(lattices, fracs):
        validate_cell(lattice, frac)
    if not lattices:
        return []
    images = knn_plan.images_needed(np.stack(lattices), [len(f) for f in fracs], k)
    if np.any(images > knn_plan.MAX_BLOCK_CANDIDATES):
        bad = int(np.argmax(images > knn_plan.MAX_BLOCK_CANDIDATES))
        knn_plan.check_images(lattices[bad], len(fracs[bad]), k)
    sizes = np.array([len(f) for f in fracs], np.int64)
    out = _Results(sizes, k)
    rows = knn_calls.table_rows(int(sizes.sum()))
    pending, radii, asked, compiled = np.arange(len(sizes)), None, None, set()
    left_out: set[int] = set()  # failures of this call
    while pending.size:
        p = knn_plan.plan([lattices[i] for i in pending], [fracs[i] for i in pending], k,
                          radii, asked)
        if failures is not None and (oversized := knn_plan.oversized_structures(p, k)):
            left_out.update(int(pending[s]) for s in oversized)
            failures.update({int(pending[s]): reason for s, reason in oversized.items()})
            keep = ~np.isin(np.arange(len(pending)), list(oversized))
            asked = None if asked is None else asked[np.repeat(keep, sizes[pending])]
            pending, radii = pending[keep], None if radii is None else radii[keep]
            continue  # the others planned again, without the failed ones
        knn_plan.check_block_candidates(p, pending, k)
        vectors = (out.vec, out.destination(p, pending))
        done, (pending, radii, asked) = out.collect(
            p, *knn_calls.run_plan(p, k, budget, sharding, rows, compiled, vectors), pending)
        if progress is not None:
            progress(done)
    return [None if i in left_out else
            Neighbours(out.dist[a : a + n], out.idx[a : a + n], float(r), out.vec[a : a + n])
            for i, (a, n, r) in enumerate(zip(out.starts, sizes, out.radius))]


def featurize_isolated(structures: Sequence[cif.Structure], k: int, **kwargs
                       ) -> tuple[list, list[Neighbours], list[cif.Skip]]:
    """featurize that skips what it cannot featurise instead of failing the batch.

    Returns (the structures featurised, their Neighbours, a Skip with the reason for each
    other one). A structure whose search outgrows the block limit is left out of the
    batch's passes (`featurize_arrays(failures=...)`); a batch failing otherwise is split
    in halves until the structure at fault is alone.
    """
    from cryknn import cif

    good, skips = split_featurizable(structures, k)
    if not good:
        return [], [], skips
    failures: dict[int, str] = {}
    try:
        found = featurize(good, k, failures=failures, **kwargs)
        skips = skips + [cif.Skip(good[i].source, good[i].id.split(":", 1)[-1], reason)
                         for i, reason in sorted(failures.items())]
        return ([s for s, nb in zip(good, found) if nb is not None],
                [nb for nb in found if nb is not None], skips)
    except (errors.FeaturizeError, MemoryError) as e:
        if len(good) == 1:
            reason = str(e) if isinstance(e, errors.FeaturizeError) else "out of memory"
            s = good[0]
            return [], [], skips + [cif.Skip(s.source, s.id.split(":", 1)[-1],
                                             reason)]
    half = len(good) // 2
    first, second = (featurize_isolated(good[:half], k, **kwargs),
                     featurize_isolated(good[half:], k, **kwargs))
    return first[0] + second[0], first[1] + second[1], skips + first[2] + second[2]


class _Results:
    """Rows of every structure in caller order, filled atom by atom as proven exact."""

    def __init__(self, sizes: np.ndarray, k: int):
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.dist = np.empty((sizes.sum(), k), np.float32)
        self.idx = np.empty((sizes.sum(), k), np.int32)
        self.vec = np.empty((sizes.sum(), k, 3), np.float32)
        self.radius = np.zeros(len(sizes))

    def destination(self, p: knn_plan.Plan, which: np.ndarray) -> np.ndarray:
        """(A,) row of the results (caller order) of each sorted row of plan p; which:
        (S,) caller index of each plan structure."""
        owner = np.repeat(np.arange(len(p.num_atoms)), p.num_atoms)
        return self.starts[which[owner]] + p.order - p.offset[owner]

    def collect(self, p: knn_plan.Plan, dist: np.ndarray, idx: np.ndarray, bound: np.ndarray,
                which: np.ndarray) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Store the proven-exact atoms of a pass; plan the rest's retry.

        An atom is exact when its own k-th distance is within its structure's radius
        (every point within the radius was a candidate), whatever its neighbours do.

        Args:
          dist, idx, bound: run_plan's rows (sorted order; idx a local sorted position).
          which: (S,) caller index of each plan structure.
        Returns:
          atoms stored, and the retry (caller indices, radii, asked atoms) for
          `plan`: the radius is the failed atoms' proven bound when within
          RETRY_GROWTH times the radius (that retry must succeed), else RETRY_GROWTH
          times the radius (which grows geometrically past the bound).
        """
        rows = (p.offset[p.block_structure][:, None] + p.block_atoms)[
            np.arange(knn_plan.QUERY_BLOCK) < p.block_queries[:, None]]
        owner = np.repeat(np.arange(len(p.num_atoms)), p.num_atoms)[rows]
        base = p.offset[owner]
        target = self.starts[which[owner]] + p.order[rows] - base
        ok = dist[rows, -1] <= p.radius[owner].astype(np.float32)
        self.dist[target[ok]] = dist[rows[ok]]
        self.idx[target[ok]] = p.order[base[ok, None] + idx[rows[ok]]] - base[ok, None]
        self.radius[which] = p.radius
        proven = np.zeros(len(p.num_atoms))
        np.maximum.at(proven, owner[~ok], bound[rows[~ok]])
        failed = np.unique(owner[~ok])
        radii = np.clip(proven * (1 + 1e-4) + 1e-6, p.radius * 1.01, p.radius * RETRY_GROWTH)
        asked = np.zeros(p.num_atoms[failed].sum(), bool)
        new_offset = np.cumsum(p.num_atoms[failed]) - p.num_atoms[failed]
        asked[new_offset[np.searchsorted(failed, owner[~ok])] + (p.order[rows] - base)[~ok]] = True
        return int(ok.sum()), (which[failed], radii[failed], asked)


def featurize(structures: Sequence[cif.Structure], k: int, **kwargs) -> list[Neighbours]:
    """featurize_arrays for Structure records (same order)."""
    return featurize_arrays(
        [s.lattice for s in structures], [s.frac for s in structures], k, **kwargs
    )


def data_parallel_sharding() -> jax.sharding.NamedSharding | None:
    """Sharding over all local devices along the batch axis (None on 1 device)."""
    if jax.device_count() == 1:
        return None
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def enable_compilation_cache(directory: str | None = None) -> str:
    """Keep compiled XLA programs on disk so later runs skip compilation.

    A first featurisation compiles one small program per candidate bucket in use
    (a handful); with the cache a rerun skips that. Directory: the argument,
    $CRYKNN_XLA_CACHE, or ~/.cache/cryknn/xla. Returns the directory used.
    """
    directory = (
        directory
        or os.environ.get("CRYKNN_XLA_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "cryknn", "xla")
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
