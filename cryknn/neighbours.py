"""Exact periodic k-nearest-neighbour distances, jit-compiled and vmapped in JAX.

For every atom of a crystal (lattice + motif) we want the k smallest distances to
all *other* points of the infinite periodic set {p_j + t : t in the lattice}.

Why it is exact on any cell (no minimum-image shortcut):
  Let h_a be the interplanar spacing of axis a (cell volume over the area of the
  opposite face). A Cartesian vector v has fractional coordinate u_a with
  |u_a| <= |v| / h_a. So every neighbour within a radius r of atom i has
  |delta_a + t_a| <= R_a = r / h_a, where delta = frac_j - frac_i wrapped into
  [-1/2, 1/2] and t is its integer lattice translation. The admissible t_a form an
  interval of length 2 R_a, i.e. at most S_a = floor(2 R_a) + 1 consecutive
  integers starting at t0_a = ceil(-R_a - delta_a). Enumerating those
  S_1 * S_2 * S_3 images per atom pair finds *every* point within r; if the k-th
  distance found is <= r, no unseen point can be closer and the result is exact.
  Otherwise the k-th distance found is still a true upper bound (all candidates
  are real points), so one retry with that radius is guaranteed to succeed.

Only atoms that can be within the radius are examined: atoms are sorted along
the axis with the narrowest reach, and each block of 32 consecutive queries looks
at the cyclic run of atoms within reach of it (its window), often a quarter of
the cell. Shapes are static for jit: atom counts, window lengths and image counts
are padded to a few buckets, and blocks run one after another so memory stays
bounded for large cells and large k.

Arithmetic is float32 with coordinates relative to the query atom (the wrapped
fractional difference), which keeps the error near 1e-6 angstrom.

Layers: `plan` (host, float64, per structure) -> `pack` (a padded `KnnBatch`, the
device kernel's pytree input) -> `knn_kernel` (jit + vmap) -> `featurize_arrays`
(bucketing, batching, retry, results in caller order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cryknn import errors
from cryknn import structures as structures_lib

# Work per device call, counted in candidate (query, neighbour, image) triples;
# one inner step holds at most this many, about 200 MB of temporaries at 2**23.
DEFAULT_CALL_BUDGET = 2**23
# Radius safety factor over the density estimate; a miss costs one retry.
RADIUS_SAFETY = 1.25
# Relative inflation of the enumeration box so float rounding never drops a
# candidate that sits on the radius boundary.
_BOX_SLACK = 1e-5
QUERY_BLOCK = 32  # queries per window; smaller blocks give narrower windows


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """k-NN of every atom of one structure.

    Attributes:
      distances: (N, k) float32, ascending, angstrom; the atom itself is excluded
        once, distinct sites that overlap it count (distance 0).
      indices: (N, k) int32 motif index of each neighbour (look up its element).
      radius: the radius (angstrom) under which the result was proven exact.
    """

    distances: np.ndarray
    indices: np.ndarray
    radius: float


# ----------------------------------------------------------------------------
# Host-side geometry: radius and image plan (float64, cheap, per structure).


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


def split_featurizable(structures: Sequence[structures_lib.Structure]
                       ) -> tuple[list[structures_lib.Structure], list[structures_lib.Skip]]:
    """The structures whose cells can be featurised, and a Skip with the reason for each
    of the others (a degenerate lattice, non-finite coordinates)."""
    good, skips = [], []
    for s in structures:
        try:
            validate_cell(s.lattice, s.frac)
            good.append(s)
        except errors.FeaturizeError as e:
            skips.append(structures_lib.Skip(s.source, s.id.split(":", 1)[-1], str(e)))
    return good, skips


def initial_radius(lattice: np.ndarray, num_atoms: int, k: int) -> float:
    """Radius (angstrom) expected to hold k neighbours, from the mean atom density.

    A sphere of this radius holds RADIUS_SAFETY**3 * (k + 1) atoms on average
    (`plan` grows it further when the image box holds fewer than k + 1 points).
    """
    volume = abs(np.linalg.det(lattice))
    r = (3.0 * (k + 1) * volume / (4.0 * math.pi * num_atoms)) ** (1.0 / 3.0)
    return RADIUS_SAFETY * r


def _image_counts(frac_radius: np.ndarray) -> np.ndarray:
    """(3,) int: floor(2 R_a) + 1 consecutive translations per axis."""
    return np.floor(2.0 * frac_radius).astype(np.int64) + 1


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def atom_bucket(num_atoms: int) -> int:
    """Padded atom count: the next power of two, at least 8.

    Padding only costs on the neighbour axis (queries are chunked), so a factor
    up to 2 is cheap, and a few hundred real structures compile about ten shapes.
    """
    return max(8, _next_power_of_two(num_atoms))


def image_bucket(num_images: int) -> int:
    return _next_power_of_two(num_images)


def window_bucket(count: int, atoms: int) -> int:
    """Window length: a quarter, half or all of the padded atoms.

    Coarse on purpose: finer steps save little work but add compilations.
    """
    for fraction in (4, 2):
        if count <= atoms // fraction:
            return atoms // fraction
    return atoms


def step_table(counts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All integer offsets in [0, S_1) x [0, S_2) x [0, S_3), padded to size.

    Returns (steps (size, 3) int32, mask (size,) bool); cached, do not modify.
    """
    return _step_table(tuple(int(c) for c in counts), size)


@functools.lru_cache(maxsize=256)
def _step_table(counts: tuple[int, int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*(np.arange(c) for c in counts), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    steps = np.zeros((size, 3), np.int32)
    steps[: len(grid)] = grid
    mask = np.zeros((size,), bool)
    mask[: len(grid)] = True
    return steps, mask


@dataclasses.dataclass
class Plan:
    """One structure planned for a device call (atoms sorted along the window axis)."""

    index: int  # position in the caller's list
    lattice: np.ndarray  # (3, 3) float64
    frac: np.ndarray  # (N, 3) float64 in [0, 1), caller's order
    radius: float
    frac_radius: np.ndarray  # (3,) radius over each interplanar spacing, inflated
    image_counts: np.ndarray  # (3,) images per axis
    order: np.ndarray  # (N,) caller's atom index of each sorted position
    window_start: np.ndarray  # (blocks,) into the sorted order
    window_count: np.ndarray  # (blocks,)

    @property
    def bucket(self) -> tuple[int, int, int]:
        """(atoms, window, images): plans with equal buckets share a compilation."""
        atoms = atom_bucket(len(self.frac))
        return (
            atoms,
            window_bucket(int(self.window_count.max()), atoms),
            image_bucket(int(np.prod(self.image_counts))),
        )


def plan(index: int, lattice, frac, k: int, radius: float | None = None) -> Plan:
    """Radius, image counts, sort order and query windows of one structure."""
    lattice = np.asarray(lattice, np.float64)
    frac = np.asarray(frac, np.float64)
    frac = frac - np.floor(frac)
    spacings = structures_lib.interplanar_spacings(lattice)
    if radius is None:
        radius = initial_radius(lattice, len(frac), k)
        # Enough images that the candidate count can reach k (matters for N << k).
        while np.prod(_image_counts(radius * (1.0 + _BOX_SLACK) / spacings)) * len(frac) < k + 1:
            radius *= 1.5
    frac_radius = radius * (1.0 + _BOX_SLACK) / spacings
    axis = int(np.argmin(frac_radius))
    order = np.argsort(frac[:, axis], kind="stable")
    start, count = _windows(
        frac[order, axis], frac_radius[axis], min(QUERY_BLOCK, atom_bucket(len(frac)))
    )
    return Plan(index, lattice, frac, float(radius), frac_radius, _image_counts(frac_radius),
                order, start, count)


def _windows(x: np.ndarray, reach: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Cyclic runs of sorted coordinates within reach of each block of queries.

    Args:
      x: (N,) sorted fractional coordinates in [0, 1) along the window axis.
      reach: R_a along that axis; any neighbour within the radius differs by at
        most this much (cyclically), so the run holds every candidate.
      block: queries per block.
    Returns:
      start (blocks,) index into x, count (blocks,) <= N, for
      blocks = ceil(padded N / block); blocks of padding only get empty runs.
    """
    n = len(x)
    blocks = atom_bucket(n) // block
    first = np.minimum(np.arange(blocks) * block, n - 1)
    last = np.minimum(first + block - 1, n - 1)
    lo, hi = x[first] - reach, x[last] + reach
    tiled = np.concatenate([x - 1.0, x, x + 1.0])
    start = np.searchsorted(tiled, lo, "left")
    count = np.searchsorted(tiled, hi, "right") - start
    covers_all = hi - lo >= 1.0
    start = np.where(covers_all, 0, start % n)
    count = np.where(covers_all, n, np.minimum(count, n))
    count[np.arange(blocks) * block >= n] = 0
    return start.astype(np.int32), count.astype(np.int32)


# ----------------------------------------------------------------------------
# Device side: one structure, then vmapped over a padded batch.


def _static():
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnnBatch:
    """A padded batch of B structures, the device kernel's input (a pytree).

    Atoms of each structure are sorted along its window axis and packed first; each
    block of Q = N // blocks consecutive queries has a window of candidate atoms that
    covers the radius (see `plan`). Array fields lose their leading B axis under vmap.

    Attributes:
      lattice: (B, 3, 3) float32, rows are cell vectors (angstrom).
      frac: (B, N, 3) float32 fractional positions in [0, 1), padded.
      num_atoms: (B,) int32 real atoms per structure (the first num_atoms rows).
      frac_radius: (B, 3) float32 search radius over each interplanar spacing.
      image_steps: (B, M, 3) int32 offsets added to the first admissible translation.
      image_mask: (B, M) bool, real offsets.
      radius: (B,) float32 search radius in angstrom.
      window_start: (B, blocks) int32 first candidate of each block of queries.
      window_count: (B, blocks) int32 candidates of each block (<= window).
      k: neighbours per atom (static).
      window: W, the candidate window length (static, >= every window_count).
    """

    lattice: jax.Array
    frac: jax.Array
    num_atoms: jax.Array
    frac_radius: jax.Array
    image_steps: jax.Array
    image_mask: jax.Array
    radius: jax.Array
    window_start: jax.Array
    window_count: jax.Array
    k: int = _static()
    window: int = _static()


def _knn_block(cell: KnnBatch, frac_planes, block):
    """k-NN of one block of query atoms against its window of candidate atoms.

    Coordinates are handled as separate x/y/z planes with the atom axis minor: XLA on
    CPU vectorises that layout far better than a trailing axis of 3.

    Args:
      cell: one structure of a KnnBatch (no batch axis).
      frac_planes: (3, N) float32, one row per axis.
      block: (query_index (Q,) int32, window start () int32, count () int32).
    Returns:
      distances (Q, k) float32 ascending, neighbour atom indices (Q, k) int32.
    """
    query_index, start, count = block
    lattice, steps, window = cell.lattice, cell.image_steps, cell.window
    slot = jnp.arange(window, dtype=jnp.int32)
    neighbour = (start + slot) % cell.num_atoms  # (W,)
    near = frac_planes[:, neighbour]  # (3, W)
    # Fractional offset of the first admissible image of every neighbour.
    first_image = []
    for a in range(3):
        delta = near[a][None, :] - frac_planes[a][query_index][:, None]  # (Q, W)
        delta = delta - jnp.round(delta)
        first_image.append(delta + jnp.ceil(-cell.frac_radius[a] - delta))
    offsets = steps.astype(lattice.dtype) @ lattice  # (M, 3) Cartesian
    d2 = 0.0
    for c in range(3):
        base = sum(first_image[a] * lattice[a, c] for a in range(3))  # (Q, W)
        v = base[:, None, :] + offsets[None, :, c, None]  # (Q, M, W)
        d2 = d2 + v * v
    # The atom itself is its own image at translation 0: for j == i, delta is
    # exactly 0, so that is the step -ceil(-R) (integer logic, no float test).
    self_step = jnp.all(steps == -jnp.ceil(-cell.frac_radius).astype(steps.dtype), axis=-1)
    is_self = neighbour[None, :] == query_index[:, None]  # (Q, W)
    is_self = is_self[:, None, :] & self_step[None, :, None]
    valid = (slot < count)[None, None, :] & cell.image_mask[None, :, None] & ~is_self
    d2 = jnp.where(valid, d2, jnp.inf).reshape(-1, steps.shape[0] * window)
    neg_d2, flat = jax.lax.top_k(-d2, cell.k)
    return jnp.sqrt(-neg_d2), neighbour[flat % window]


def _knn_structure(cell: KnnBatch):
    """k-NN for every atom of one padded structure; see knn_kernel for shapes."""
    num_padded, num_blocks = cell.frac.shape[0], cell.window_start.shape[0]
    queries = jnp.arange(num_padded, dtype=jnp.int32).reshape(num_blocks, -1)
    run = functools.partial(_knn_block, cell, cell.frac.T)
    dist, idx = jax.lax.map(run, (queries, cell.window_start, cell.window_count))
    dist = dist.reshape(num_padded, cell.k)
    idx = idx.reshape(num_padded, cell.k)
    kth = jnp.where(jnp.arange(num_padded) < cell.num_atoms, dist[:, -1], 0.0)
    exact = jnp.all(kth <= cell.radius)
    return dist, idx, exact


@jax.jit
def knn_kernel(batch: KnnBatch):
    """Exact periodic k-NN for a padded batch of structures (jit + vmap).

    Returns:
      distances (B, N, k) float32 ascending, indices (B, N, k) int32 sorted-order atom
      index of each neighbour, exact (B,) bool: True when every k-th distance <= radius,
      which proves the result exact. Rows of padded atoms are meaningless.
    """
    return jax.vmap(_knn_structure)(batch)


# ----------------------------------------------------------------------------
# Host wrapper: bucket, batch, retry.


def _batch_size(atoms: int, window: int, images: int, budget: int, jobs: int, multiple: int) -> int:
    """Structures per call: about `budget` triples in all, a power of two.

    Counting whole structures (not one block) keeps large cells to one or two per
    call, so a half-empty last batch never pads with many large dummy cells.
    """
    per_structure = atoms * window * images
    size = max(1, budget // per_structure)
    size = min(_next_power_of_two(size + 1) // 2, _next_power_of_two(jobs))
    return max(multiple, -(-size // multiple) * multiple)


def pack(plans: Sequence[Plan], size: int, bucket: tuple[int, int, int], k: int) -> KnnBatch:
    """A KnnBatch of `size` structures (numpy arrays): the plans, then empty padding."""
    atoms, window, images = bucket
    lattice = np.tile(np.eye(3, dtype=np.float32), (size, 1, 1))
    frac = np.zeros((size, atoms, 3), np.float32)
    num_atoms = np.ones((size,), np.int32)  # padding structures: one atom, no queries
    frac_radius = np.zeros((size, 3), np.float32)
    steps = np.zeros((size, images, 3), np.int32)
    step_mask = np.zeros((size, images), bool)
    radius = np.zeros((size,), np.float32)
    blocks = atoms // min(QUERY_BLOCK, atoms)
    window_start = np.zeros((size, blocks), np.int32)
    window_count = np.zeros((size, blocks), np.int32)
    for b, p in enumerate(plans):
        n = len(p.frac)
        lattice[b] = p.lattice
        frac[b, :n] = p.frac[p.order]  # wrapped on the host in float64
        num_atoms[b] = n
        frac_radius[b] = p.frac_radius
        steps[b], step_mask[b] = step_table(p.image_counts, images)
        radius[b] = p.radius
        window_start[b], window_count[b] = p.window_start, p.window_count
    return KnnBatch(lattice, frac, num_atoms, frac_radius, steps, step_mask, radius,
                    window_start, window_count, k=k, window=window)


def _run_bucket(plans: list[Plan], bucket: tuple[int, int, int], k: int, budget: int,
                sharding) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Featurise plans that share a bucket; returns rows in caller order per plan."""
    atoms, window, images = bucket
    multiple = 1 if sharding is None else sharding.mesh.size
    size = _batch_size(atoms, window, images, budget, len(plans), multiple)
    out = []
    for begin in range(0, len(plans), size):
        chunk = plans[begin : begin + size]
        batch = pack(chunk, size, bucket, k)
        if sharding is not None:
            batch = jax.device_put(batch, sharding)
        dist, idx, exact = jax.device_get(knn_kernel(batch))
        for b, p in enumerate(chunk):
            n = len(p.frac)
            rows = np.empty((n, k), np.float32)
            neighbours = np.empty((n, k), np.int32)
            rows[p.order] = dist[b, :n]
            neighbours[p.order] = p.order[idx[b, :n]]
            out.append((rows, neighbours, bool(exact[b])))
    return out


def featurize_arrays(
    lattices: Sequence[np.ndarray],
    fracs: Sequence[np.ndarray],
    k: int,
    *,
    budget: int = DEFAULT_CALL_BUDGET,
    sharding: jax.sharding.NamedSharding | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Neighbours]:
    """Exact k-NN for any list of cells; results in input order.

    Args:
      lattices: per structure (3, 3) rows are cell vectors (angstrom).
      fracs: per structure (N, 3) fractional positions.
      k: neighbours per atom (>= 1; may exceed the atoms per cell).
      budget: candidate triples per device call (memory bound).
      sharding: optional NamedSharding over a 1-D mesh; batches are split over
        its devices along the structure axis.
      progress: called with the number of atoms finished after each group.
    Returns:
      One Neighbours per structure, each proven exact.
    """
    if k < 1:
        raise errors.FeaturizeError(f"k must be >= 1, got {k}")
    if len(lattices) != len(fracs):
        raise errors.FeaturizeError("lattices and fracs differ in length")
    pending = []
    for i, (lattice, frac) in enumerate(zip(lattices, fracs)):
        validate_cell(lattice, frac)
        pending.append(plan(i, lattice, frac, k))
    results: list[Neighbours | None] = [None] * len(pending)
    while pending:
        buckets: dict[tuple[int, int, int], list[Plan]] = {}
        for p in pending:
            buckets.setdefault(p.bucket, []).append(p)
        retry = []
        for bucket, plans in sorted(buckets.items()):
            for p, (dist, idx, exact) in zip(plans, _run_bucket(plans, bucket, k, budget,
                                                                sharding)):
                if exact:
                    results[p.index] = Neighbours(dist, idx, p.radius)
                    if progress is not None:
                        progress(len(p.frac))
                else:
                    retry.append(_replan(p, dist, k))
        pending = retry
    return results  # type: ignore[return-value]


def _replan(p: Plan, dist: np.ndarray, k: int) -> Plan:
    """Re-plan with the largest k-th distance found: a proven-sufficient radius."""
    kth = float(np.max(dist[:, -1]))
    if np.isfinite(kth):
        radius = max(kth * (1 + 1e-4) + 1e-6, p.radius)
    else:  # too few candidates in the box: grow it
        radius = p.radius * 2.0
    return plan(p.index, p.lattice, p.frac, k, radius=radius)


def featurize(structures: Sequence[structures_lib.Structure], k: int, **kwargs) -> list[Neighbours]:
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

    A first featurisation of a few hundred assorted cells spends most of its
    time compiling (one program per bucket); with the cache a rerun spends a
    fraction of that. Directory: the argument, $CRYKNN_XLA_CACHE, or
    ~/.cache/cryknn/xla. Returns the directory used.
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
