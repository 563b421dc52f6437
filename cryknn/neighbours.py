"""Exact periodic k-nearest-neighbour distances, jit-compiled and vmapped in JAX.

For every atom of a crystal (lattice + motif) we want the k smallest distances to
all *other* points of the infinite periodic set {p_j + t : t in the lattice}.

Why it is exact on any cell (no minimum-image shortcut):
  Let h_a be the interplanar spacing of axis a (cell volume over the area of the
  opposite face). A Cartesian vector v has fractional coordinate u_a with
  |u_a| <= |v| / h_a. So every neighbour within a radius r of atom i has
  |delta_a + t_a| <= R_a = r / h_a, where delta = frac_j - frac_i (both in [0, 1))
  and t is its integer lattice translation. The admissible t_a form an interval of
  length 2 R_a, i.e. at most S_a = floor(2 R_a) + 1 consecutive integers starting
  at t0_a = ceil(-R_a - delta_a). Enumerating those S_1 * S_2 * S_3 images per atom
  pair finds *every* point within r; if the k-th distance found is <= r, no unseen
  point can be closer and that atom's result is exact (whatever other atoms do).
  Candidates beyond r (tested with a slack, so rounding drops none within r) are
  set to +inf before the top-k: they could not make a result exact.
  Atoms with fewer than k points within r are retried alone with a larger radius:
  the farthest of any k + 1 real candidate points is a proven upper bound on the
  k-th distance, so a retry with it must succeed; the retry radius is that bound
  capped at 1.5 r (a far bound must not blow up the retry), so it grows
  geometrically until it passes the bound.

Only atoms that can be within the radius are examined: each structure's atoms are
sorted along the axis with the narrowest reach, and each block of 32 consecutive
queries looks at the cyclic run of atoms within reach of it (its window). A block's
candidates are (window atom, image) pairs, flattened into one axis of C slots.

Why blocks, not structures, are the unit of work (profiled on CoRE MOF, pyxtal and
COD cells; see experiments/profile_featurize.py): XLA's CPU top_k (a scalar partial
sort) costs several ns per candidate while the distance itself costs well under one,
so the time is the number of *padded* candidates, plus the top_k heap entries (each
~log k mispredicted comparisons), which the +inf beyond r keeps near k per query. Padding whole structures to
(atoms, window, images) buckets tripled that number; padding each block's flat
candidate count to the next of {2^j, 1.5 * 2^j} wastes about a fifth, and the
compiled programs depend only on (C, k), not on the structure sizes, so a corpus
compiles a handful of small programs. Every call gathers its atoms from one table of
all the structures' sorted atoms; a device loop runs over only the real blocks.

Arithmetic is float32 with coordinates relative to the query atom (the fractional
difference), which keeps the error near 1e-6 angstrom. The lattice is rotated to a
lower-triangular basis first (distances do not change), which saves three of the
nine multiply-adds per candidate.

Displacement vectors (neighbour image minus atom, angstrom, in the caller's unrotated
frame) come from the same search: top_k picks candidate slots, and only for the k picked
slots the kernel recomputes the image (the same float32 operations as the distance, plus
the slot's integer step) and multiplies it by the original cell. So a vector always
belongs to its distance and index, ties included, at a cost of k (not C) per query.

Layers: `plan` (host, float64, vectorised over structures) -> `pack` (a padded
`KnnBatch` of blocks, the device kernel's pytree input) -> `knn_kernel` (jit, loop
over groups of vmapped blocks) -> `featurize_arrays` (bucketing, calls, retry,
results in caller order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cryknn import errors
from cryknn import geometry

if TYPE_CHECKING:  # the CIF reader (gemmi) is not needed to featurise arrays
    from cryknn import cif

# Work per device call, counted in candidate (query, neighbour, image) triples.
DEFAULT_CALL_BUDGET = 2**23
# Triples per step of the device loop (memory: ~40 bytes each, so a few MB; a
# single block larger than this, e.g. a 2,000-atom cell at k=100, runs alone).
STEP_TRIPLES = 2**17
# Buckets holding fewer than this fraction of a pass's blocks merge upward.
RARE_BUCKET = 0.03
# Neighbours (query, k) per call: bounds the outputs (~1 MB) a padded call moves.
CALL_OUTPUTS = 2**17
# The first radius holds 1 + RADIUS_MARGIN / sqrt(k + 1) times the k + 1 points
# expected from the density: a Poisson count's relative spread falls as
# 1/sqrt(k + 1), so large k needs little margin. Atoms that miss are retried alone,
# but a retry pass has a fixed cost (~3 ms), which small corpora notice: 3.0 (not
# 2.3) spares pyxtal's 100 cells a retry at k=5 (+35%) for ~2-5% elsewhere.
RADIUS_MARGIN = 3.0
# Largest radius growth per retry (3.4 times the volume); see _Results.collect.
RETRY_GROWTH = 1.5
# Relative inflation of the enumeration box so float rounding never drops a
# candidate that sits on the radius boundary.
_BOX_SLACK = 1e-5
QUERY_BLOCK = 32  # queries per block; smaller blocks give narrower windows
MIN_CANDIDATES = 32  # smallest candidate bucket


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


# ----------------------------------------------------------------------------
# Host-side geometry: radius and image plan (float64, vectorised over structures).


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
    too_many = images_needed(np.stack([s.lattice for s in good]),
                             [s.num_atoms for s in good], k) > MAX_BLOCK_CANDIDATES
    for s in [s for s, bad in zip(good, too_many) if bad]:
        try:
            check_images(s.lattice, s.num_atoms, k)
        except errors.FeaturizeError as e:
            skips.append(cif.Skip(s.source, s.id.split(":", 1)[-1], str(e)))
    return [s for s, bad in zip(good, too_many) if not bad], skips


# Candidate slots (atom, image) of one query block at most: a block takes ~2 KB per slot
# on the device (32 queries, ~15 float32 temporaries each), so 2^18 slots are ~0.5 GB.
# Real cells need < 2^16 even at k = 100; a cell that is a needle or a sheet (a = 1e-6 A,
# b = c = 1e6 A) would need billions.
MAX_BLOCK_CANDIDATES = 2**18
# Neighbours per atom at most (memory grows with k; the research uses k <= 100).
MAX_K = 1024


def check_k(k) -> int:
    """k as an int; FeaturizeError unless it is an integer in 1..MAX_K."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise errors.FeaturizeError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise errors.FeaturizeError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise errors.FeaturizeError(f"k = {k}: at most {MAX_K} neighbours per atom")
    return int(k)


def images_needed(lattices: np.ndarray, num_atoms, k: int) -> np.ndarray:
    """(S,) lattice images the first search for k neighbours takes per structure (as
    `plan` grows its radius until the box can hold k + 1 points); computed in float64,
    nothing allocated per image. lattices (S, 3, 3), num_atoms (S,)."""
    lattices = np.asarray(lattices, np.float64).reshape(-1, 3, 3)
    num_atoms = np.asarray(num_atoms, np.float64).reshape(-1)
    spacings = geometry.interplanar_spacings(lattices)
    radius = initial_radius(lattices, num_atoms, k)
    for _ in range(200):
        frac_radius = np.minimum(radius[:, None] * (1.0 + _BOX_SLACK) / spacings, 1e15)
        images = np.prod(np.floor(2.0 * frac_radius) + 1.0, axis=1)
        short = (images * num_atoms < k + 1) & (images <= MAX_BLOCK_CANDIDATES)
        if not short.any():
            break
        radius = np.where(short, radius * 1.5, radius)
    return images


def check_images(lattice: np.ndarray, num_atoms: int, k: int) -> None:
    """FeaturizeError when the first search for k neighbours alone needs more lattice
    images than a block may hold (MAX_BLOCK_CANDIDATES)."""
    (images,) = images_needed(lattice, [num_atoms], k)
    if images > MAX_BLOCK_CANDIDATES:
        spacings = geometry.interplanar_spacings(np.asarray(lattice, np.float64))
        raise errors.FeaturizeError(
            f"needs {images:.3g} lattice images (limit {MAX_BLOCK_CANDIDATES}): cell too "
            f"anisotropic or too sparse for k = {k} (interplanar spacings "
            f"{', '.join(f'{h:.3g}' for h in spacings)} A)")


def initial_radius(lattice: np.ndarray, num_atoms, k: int):
    """Radius (angstrom) expected to hold k neighbours, from the mean atom density.

    A sphere of this radius holds (1 + RADIUS_MARGIN / sqrt(k + 1)) * (k + 1) atoms
    on average (`plan` grows it further when the image box holds fewer than k + 1
    points). Vectorised: lattice (..., 3, 3) and num_atoms (...) give radii (...).
    """
    volume = np.abs(np.linalg.det(np.asarray(lattice, np.float64)))
    points = (k + 1) * (1.0 + RADIUS_MARGIN / math.sqrt(k + 1))
    return (3.0 * points * volume / (4.0 * math.pi * np.asarray(num_atoms))) ** (1.0 / 3.0)


def _image_counts(frac_radius: np.ndarray) -> np.ndarray:
    """(..., 3) int: floor(2 R_a) + 1 consecutive translations per axis."""
    return np.floor(2.0 * frac_radius).astype(np.int64) + 1


def _next_power_of_two(n):
    """Elementwise smallest power of two >= n (n >= 1)."""
    n = np.asarray(n, np.int64)
    return np.left_shift(1, np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64))


def candidate_bucket(count, k: int):
    """Padded candidate slots per block: the next of {2^j, 1.5 * 2^j}, > max(count, k).

    Half-octave steps waste a fifth on average; each bucket is one compiled program.
    """
    count = np.maximum(np.maximum(count, k + 1), MIN_CANDIDATES)
    upper = _next_power_of_two(count)
    return np.where(count <= upper * 3 // 4, upper * 3 // 4, upper)


@dataclasses.dataclass
class Plan:
    """S structures planned for device calls: atoms sorted, queries cut into blocks.

    Atoms of all structures are concatenated (structure s owns rows offset[s] ...
    offset[s] + num_atoms[s] - 1); within a structure they are sorted along the axis
    with the narrowest reach. Block b holds `block_queries[b]` consecutive query atoms
    (all atoms, or the ones a retry asks for) of structure `block_structure[b]`, at
    local sorted positions `block_atoms[b, :block_queries[b]]`.
    """

    lattice: np.ndarray  # (S, 3, 3) float64
    num_atoms: np.ndarray  # (S,) int64
    offset: np.ndarray  # (S,) int64 first row of each structure
    radius: np.ndarray  # (S,) float64 angstrom
    frac_radius: np.ndarray  # (S, 3) radius over each interplanar spacing, inflated
    image_counts: np.ndarray  # (S, 3) images per axis
    order: np.ndarray  # (A,) caller's row (concatenated) of each sorted position
    sorted_frac: np.ndarray  # (A, 3) float64 in [0, 1), sorted per structure
    block_structure: np.ndarray  # (blocks,)
    block_atoms: np.ndarray  # (blocks, QUERY_BLOCK) local sorted positions of the queries
    block_queries: np.ndarray  # (blocks,) real queries, <= QUERY_BLOCK
    window_start: np.ndarray  # (blocks,) local sorted position of the first candidate
    window_count: np.ndarray  # (blocks,) candidate atoms, <= num_atoms

    @property
    def block_candidates(self) -> np.ndarray:
        """(blocks,) real (atom, image) candidate pairs of each block."""
        return self.window_count * np.prod(self.image_counts, axis=1)[self.block_structure]


def plan(lattices: Sequence[np.ndarray], fracs: Sequence[np.ndarray], k: int,
         radii: np.ndarray | None = None, queries: np.ndarray | None = None) -> Plan:
    """Radius, image counts, sort order and query blocks of every structure.

    Args:
      lattices, fracs: per structure (3, 3) and (N, 3) (validated by the caller).
      k: neighbours per atom.
      radii: (S,) search radii; default from the density, grown until the image box
        holds k + 1 points.
      queries: (sum N,) bool, the atoms to answer (caller order, concatenated);
        default all. Every atom is still a candidate neighbour.
    """
    lattice = np.asarray(np.stack(lattices), np.float64)
    num_atoms = np.array([len(f) for f in fracs], np.int64)
    offset = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])
    frac = geometry.wrap(np.concatenate(fracs).astype(np.float64))
    spacings = geometry.interplanar_spacings(lattice)
    if radii is None:
        radii = initial_radius(lattice, num_atoms, k)
        # Enough images that the candidate count can reach k (matters for N << k).
        while True:
            counts = _image_counts(radii[:, None] * (1.0 + _BOX_SLACK) / spacings)
            short = np.prod(counts, axis=1) * num_atoms < k + 1
            if not short.any():
                break
            radii = np.where(short, radii * 1.5, radii)
    radii = np.asarray(radii, np.float64)
    frac_radius = radii[:, None] * (1.0 + _BOX_SLACK) / spacings
    axis = np.argmin(frac_radius, axis=1)
    owner = np.repeat(np.arange(len(num_atoms)), num_atoms)
    x = frac[np.arange(len(frac)), axis[owner]]
    order = np.lexsort((x, owner))
    asked = np.ones(len(frac), bool) if queries is None else np.asarray(queries)[order]
    blocks = _blocks(x[order], owner, num_atoms, offset,
                     frac_radius[np.arange(len(axis)), axis], np.flatnonzero(asked))
    return Plan(lattice, num_atoms, offset, radii, frac_radius, _image_counts(frac_radius),
                order, frac[order], *blocks)


def _blocks(x: np.ndarray, owner: np.ndarray, num_atoms: np.ndarray, offset: np.ndarray,
            reach: np.ndarray, asked: np.ndarray) -> tuple[np.ndarray, ...]:
    """Query blocks and the cyclic window of atoms within reach of each.

    Args:
      x: (A,) sorted fractional coordinate of each atom along its structure's axis.
      owner: (A,) structure of each row; num_atoms, offset: (S,); reach: (S,) R_a
        along the axis. Any neighbour within the radius differs by at most R_a
        (cyclically), so the run holds every candidate.
      asked: (A',) ascending sorted rows of the query atoms.
    Returns:
      block_structure, block_atoms (blocks, Q), block_queries, window_start,
      window_count (blocks,).
    """
    asked_per = np.bincount(owner[asked], minlength=len(num_atoms))
    per = -(-asked_per // QUERY_BLOCK)
    structure = np.repeat(np.arange(len(num_atoms)), per)
    first_asked = np.cumsum(asked_per) - asked_per  # into `asked`, per structure
    first = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)) * QUERY_BLOCK
    queries = np.minimum(QUERY_BLOCK, asked_per[structure] - first)
    last = (first_asked + asked_per - 1)[structure]
    rows = asked[np.minimum((first_asked[structure] + first)[:, None]
                            + np.arange(QUERY_BLOCK), last[:, None])]  # (blocks, Q)
    n = num_atoms[structure]
    base = offset[structure]
    lo = x[rows[:, 0]] - reach[structure]
    hi = x[rows[np.arange(len(rows)), queries - 1]] + reach[structure]
    keys = owner + x  # ascending: sorted by (structure, x)

    def below(v, side):  # atoms of the cyclic cover below v: floor(v) * n + rank
        whole = np.floor(v)
        rank = np.searchsorted(keys, structure + (v - whole), side) - base
        return whole.astype(np.int64) * n + rank

    start = below(lo, "left")
    count = below(hi, "right") - start
    covers_all = (hi - lo >= 1.0) | (count >= n)
    start = np.where(covers_all, 0, start % n)
    count = np.where(covers_all, n, count)
    return structure, (rows - base[:, None]).astype(np.int32), queries, start, count


# ----------------------------------------------------------------------------
# Device side: one block of queries, then a loop over groups of vmapped blocks.


def _static():
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnnBatch:
    """A padded batch of query blocks, the device kernel's input (a pytree).

    Blocks are laid out (D, P): D devices (1 unsharded), P blocks each; the first
    num_blocks[d] blocks of row d are real. Each block is Q = QUERY_BLOCK consecutive
    sorted atoms of one structure; its C = `window` candidate slots are the pairs
    (window atom w, image m) at slot m * window_count + w.

    Attributes:
      table: (T, 3) float32 sorted fractional positions in [0, 1) of every structure
        of the call's plan (rows offset ... offset + num_atoms - 1), padded with Q rows.
      lattice: (D, P, 3, 3) float32 lower-triangular cell rows (angstrom), a rotation
        of the structure's lattice.
      frac_radius: (D, P, 3) float32 search radius over each interplanar spacing.
      radius: (D, P) float32 search radius (angstrom), inflated like frac_radius.
      image_counts: (D, P, 3) int32 S_a, images per axis.
      offset: (D, P) int32 table row of the structure's first atom.
      num_atoms: (D, P) int32 atoms of the structure (>= 1).
      query_atoms: (D, P, Q) int32 local sorted positions of the block's queries.
      num_queries: (D, P) int32 real queries of the block (<= Q).
      window_start: (D, P) int32 local sorted position of the first window atom.
      window_count: (D, P) int32 window atoms (window_count * images <= C).
      num_blocks: (D,) int32 real blocks per device row.
      cell: (D, P, 3, 3) float32 the structure's lattice rows as given (not rotated):
        displacement vectors are reported in its frame.
      k: neighbours per atom (static).
      window: C, candidate slots per block (static, >= k).
      group: blocks vmapped per loop step (static, divides P).
    """

    table: jax.Array
    lattice: jax.Array
    frac_radius: jax.Array
    radius: jax.Array
    image_counts: jax.Array
    offset: jax.Array
    num_atoms: jax.Array
    query_atoms: jax.Array
    num_queries: jax.Array
    window_start: jax.Array
    window_count: jax.Array
    num_blocks: jax.Array
    cell: jax.Array
    k: int = _static()
    window: int = _static()
    group: int = _static()


_BLOCK_FIELDS = ("lattice", "frac_radius", "radius", "image_counts", "offset", "num_atoms",
                 "query_atoms",
                 "window_start", "window_count", "cell")


def _candidates(table, block, window):
    """Fractional position, local atom index and image step of each candidate slot.

    Returns: position (C, 3) float32, atom (C,) int32, step (C, 3) int32, valid (C,).
    """
    lattice, frac_radius, radius, counts, offset, n, query_atom, start, count, _ = block
    slot = jnp.arange(window, dtype=jnp.int32)
    image = slot // jnp.maximum(count, 1)
    atom = (start + slot - image * count) % n
    step = jnp.stack([image // (counts[1] * counts[2]), (image // counts[2]) % counts[1],
                      image % counts[2]], axis=-1)
    valid = image < counts[0] * counts[1] * counts[2]
    return table[offset + atom], atom, step, valid


def _knn_block(table, block, k, window):
    """k-NN of one block of queries against its candidate slots.

    Args:
      table: (T, 3) float32, see KnnBatch.
      block: one block's fields of _BLOCK_FIELDS (no batch axes).
    Returns:
      distances (Q, k) float32 ascending (+inf beyond the radius), neighbour local
      sorted index (Q, k) int32, the retry bound (Q,) float32 (see _retry_bound) and
      the displacement vectors (Q, k, 3) float32 (see _selected_vectors).
    """
    lattice, frac_radius, radius, counts, offset, n, query_atom, start, count, cell = block
    near, atom, step, valid = _candidates(table, block, window)
    query = table[offset + query_atom]  # (Q, 3)
    shift = step.astype(lattice.dtype) @ lattice  # (C, 3) Cartesian image offsets
    # u_a: fractional offset of the first admissible image (in [-R_a, 1 - R_a)).
    u = []
    for a in range(3):
        delta = near[None, :, a] - query[:, None, a]  # (Q, C)
        u.append(delta + jnp.ceil(-frac_radius[a] - delta))
    # Lower-triangular rows: x uses all three, y two, z one.
    x = u[0] * lattice[0, 0] + u[1] * lattice[1, 0] + u[2] * lattice[2, 0] + shift[:, 0]
    y = u[1] * lattice[1, 1] + u[2] * lattice[2, 1] + shift[:, 1]
    z = u[2] * lattice[2, 2] + shift[:, 2]
    raw = d2 = x * x + y * y + z * z
    # The atom itself is its own image at translation 0: for j == i, delta is exactly
    # 0, so that is the step -ceil(-R) (integer logic, no float test).
    self_step = jnp.all(step == -jnp.ceil(-frac_radius).astype(step.dtype), axis=-1)
    is_self = (atom[None, :] == query_atom[:, None]) & self_step[None, :]
    # Candidates beyond the radius cannot make a result proven exact; as +inf they
    # never enter top_k's heap, which is most of its cost (a heap entry costs
    # ~log k mispredicted comparisons, a rejected candidate one predictable one).
    d2 = jnp.where(valid[None, :] & ~is_self & (d2 <= radius * radius), d2, jnp.inf)
    neg_d2, slot = jax.lax.top_k(-d2, k)
    vectors = _selected_vectors(near[slot], step[slot], query, frac_radius, cell)
    return (jnp.sqrt(-neg_d2), atom[slot], jnp.sqrt(_retry_bound(raw, counts, count, k)),
            vectors)


def _selected_vectors(near, step, query, frac_radius, cell):
    """(Q, k, 3) Cartesian displacements of the k selected candidates of each query.

    Only the k chosen slots are gathered (near, step: (Q, k, 3)), so this costs k, not
    C, per query. The image is the one the distance used: delta and its first
    admissible translation ceil(-R_a - delta) are recomputed by the same float32
    operations, plus the slot's integer step; the sum times the unrotated cell rows
    (as multiply-adds: XLA's CPU dot on 3-vectors costs more than the rest).
    """
    delta = near - query[:, None, :]
    u = delta + (jnp.ceil(-frac_radius - delta) + step.astype(delta.dtype))
    return u[..., 0:1] * cell[0] + u[..., 1:2] * cell[1] + u[..., 2:3] * cell[2]


def _retry_bound(d2, counts, count, k):
    """(Q,) a proven upper bound on each query's squared k-th distance, or +inf.

    Slots 0 ... k are k + 1 real points when the block has that many candidates,
    at most one of them the atom itself (at distance 0): the farthest bounds the
    k-th neighbour, so a retry with that radius must succeed.
    """
    enough = count * counts[0] * counts[1] * counts[2] >= k + 1
    return jnp.where(enough, jnp.max(d2[:, : k + 1], axis=1), jnp.inf)


def _kernel_local(batch: KnnBatch):
    """knn_kernel on the blocks of one device (or all blocks, unsharded)."""
    devices, per_device = batch.num_queries.shape
    g, k, q = batch.group, batch.k, QUERY_BLOCK
    fields = tuple(getattr(batch, name) for name in _BLOCK_FIELDS)
    one = functools.partial(_knn_block, batch.table, k=k, window=batch.window)
    run = jax.vmap(jax.vmap(lambda *block: one(block)))

    def step(i, out):
        part = [jax.lax.dynamic_slice_in_dim(f, i * g, g, axis=1) for f in fields]
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, r, i * g, axis=1)
                     for o, r in zip(out, run(*part)))

    out = (jnp.zeros((devices, per_device, q, k), jnp.float32),
           jnp.zeros((devices, per_device, q, k), jnp.int32),
           jnp.zeros((devices, per_device, q), jnp.float32),
           jnp.zeros((devices, per_device, q, k, 3), jnp.float32))
    steps = (jnp.max(batch.num_blocks) + g - 1) // g
    return jax.lax.fori_loop(0, steps, step, out)


# LLVM's expensive passes cost a quarter of each compilation and gain nothing
# measurable on this kernel (same run time on CoRE MOF buckets).
@functools.partial(jax.jit, compiler_options={"xla_llvm_disable_expensive_passes": True})
def knn_kernel(batch: KnnBatch):
    """Exact periodic k-NN for a padded batch of query blocks.

    A loop steps over groups of `group` blocks (vmapped) and stops after the last
    real block, so padding blocks cost no compute. When the block fields are sharded
    along a mesh axis (`data_parallel_sharding`), each device loops over its own
    blocks against the replicated table (shard_map: no collectives).

    Returns:
      distances (D, P, Q, k) float32 ascending (+inf beyond the radius), indices
      (D, P, Q, k) int32: the local sorted position of each neighbour, a retry
      bound (D, P, Q) float32 on each k-th distance, and the displacement vectors
      (D, P, Q, k, 3) float32 (neighbour minus query, in the frame of `cell`) of the
      same candidates. Rows of padding are meaningless.
    """
    sharding = jax.typeof(batch.num_blocks).sharding
    axis = sharding.spec[0] if len(sharding.spec) else None
    if sharding.mesh.empty or axis is None:
        return _kernel_local(batch)
    split = jax.sharding.PartitionSpec(axis)
    specs = dataclasses.replace(jax.tree.map(lambda _: split, batch),
                                table=jax.sharding.PartitionSpec())
    return jax.shard_map(_kernel_local, mesh=sharding.mesh, in_specs=(specs,),
                         out_specs=split, check_vma=False)(batch)


# ----------------------------------------------------------------------------
# Host wrapper: bucket blocks, pack calls, collect rows, retry.


def merge_rare_buckets(buckets: np.ndarray) -> np.ndarray:
    """(blocks,) buckets, each rare one (< RARE_BUCKET of the blocks) merged into the
    next larger common one (or the largest).

    A compilation (~0.5 s on CPU) costs more than padding a few percent of the
    blocks to the next size, so a cold run compiles only the common sizes.
    """
    sizes, counts = np.unique(buckets, return_counts=True)
    keep = (counts >= RARE_BUCKET * len(buckets)) | (sizes == sizes[-1])
    kept = sizes[keep]
    return kept[np.searchsorted(kept, buckets)]


def lower_triangular(lattices: np.ndarray) -> np.ndarray:
    """(S, 3, 3) rotations of lattice rows to lower-triangular form (same distances).

    With L^T = Q R, L Q = R^T: an orthogonal change of Cartesian frame.
    """
    _, r = np.linalg.qr(np.swapaxes(lattices, 1, 2))
    return np.swapaxes(r, 1, 2)


def call_shape(window: int, k: int, budget: int, devices: int) -> tuple[int, int]:
    """(blocks per call, blocks per loop step) for candidate bucket `window`.

    A call holds at most `budget` triples and CALL_OUTPUTS neighbours; a loop step
    about STEP_TRIPLES triples. Both are powers of two and the call a multiple of
    devices * step. Every call of a bucket has this size (padding blocks cost only
    their share of the outputs), so a bucket compiles once.
    """
    per_block = QUERY_BLOCK * window
    group = _power_of_two_below(min(64, STEP_TRIPLES // per_block))
    size = _power_of_two_below(min(budget // per_block, CALL_OUTPUTS // (QUERY_BLOCK * k)))
    return max(size, group * devices), group


def _power_of_two_below(n: int) -> int:
    """Largest power of two <= n, at least 1."""
    return 1 << max(0, int(n).bit_length() - 1)


def pack(p: Plan, blocks: np.ndarray, size: int, window: int, group: int, k: int,
         table: jax.Array, devices: int = 1) -> KnnBatch:
    """A KnnBatch of `size` block slots: the given plan blocks, then empty padding.

    Block i goes to device row i % devices, so rows differ by at most one block.
    """
    per_device = size // devices
    s = p.block_structure[blocks]
    slot = np.arange(len(blocks))
    where = (slot % devices, slot // devices)

    def field(values, fill, dtype, shape=()):
        out = np.full((devices, per_device) + shape, fill, dtype)
        out[where] = values
        return out

    eye = np.eye(3, dtype=np.float32)
    num_blocks = np.bincount(slot % devices, minlength=devices).astype(np.int32)
    return KnnBatch(
        table, field(lower_triangular(p.lattice[s]), eye, np.float32, (3, 3)),
        field(p.frac_radius[s], 0.0, np.float32, (3,)),
        field(p.radius[s] * (1.0 + _BOX_SLACK), 0.0, np.float32),
        field(p.image_counts[s], 1, np.int32, (3,)), field(p.offset[s], 0, np.int32),
        field(p.num_atoms[s], 1, np.int32), field(p.block_atoms[blocks], 0, np.int32, (QUERY_BLOCK,)),
        field(p.block_queries[blocks], 0, np.int32), field(p.window_start[blocks], 0, np.int32),
        field(p.window_count[blocks], 0, np.int32), num_blocks,
        field(p.lattice[s], eye, np.float32, (3, 3)),
        k=k, window=window, group=group)


def _table(p: Plan, rows: int, sharding) -> jax.Array:
    """The plan's sorted positions as a (rows, 3) float32 device array (replicated)."""
    table = np.zeros((rows, 3), np.float32)
    table[: len(p.sorted_frac)] = p.sorted_frac
    if sharding is None:
        return jnp.asarray(table)
    return jax.device_put(table, jax.sharding.NamedSharding(sharding.mesh,
                                                            jax.sharding.PartitionSpec()))


def run_plan(p: Plan, k: int, budget: int, sharding, rows: int, compiled: set | None = None,
             vectors: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN of every atom of a plan, in sorted order.

    Args:
      compiled: candidate buckets earlier passes used; a retry's few blocks go to the
        smallest of them that fits rather than compile another size. Updated.
      vectors: optional (out (A', k, 3) float32, destination (A,) row of out for each
        sorted row): the queries' displacement vectors are written straight there,
        proven exact or not (a retry overwrites those that were not), which spares
        the (A, k, 3) array two reorderings.
    Returns distances (A, k) float32, neighbour local sorted positions (A, k) int32
    and the retry bound (A,) float32 of each atom (see knn_kernel).
    """
    devices = 1 if sharding is None else sharding.mesh.size
    table = _table(p, rows, sharding)
    buckets = merge_rare_buckets(candidate_bucket(p.block_candidates, k))
    if compiled:
        known = np.array(sorted(compiled))
        fits = np.searchsorted(known, buckets)
        buckets = np.where(fits < len(known), known[np.minimum(fits, len(known) - 1)], buckets)
    if compiled is not None:
        compiled.update(buckets.tolist())
    calls = []
    for window in np.unique(buckets):
        todo = np.flatnonzero(buckets == window)
        size, group = call_shape(int(window), k, budget, devices)
        for begin in range(0, len(todo), size):
            blocks = todo[begin : begin + size]
            batch = pack(p, blocks, size, int(window), group, k, table, devices)
            if sharding is not None:
                batch = jax.device_put(batch, _batch_sharding(batch, sharding))
            calls.append((blocks, size, knn_kernel(batch)))  # dispatched, not awaited
    outs = (np.empty((len(p.order), k), np.float32), np.empty((len(p.order), k), np.int32),
            np.empty((len(p.order),), np.float32))
    for blocks, size, result in calls:
        rows, keep, slots = _block_rows(p, blocks, size, devices)
        source = (slots[:, None] * QUERY_BLOCK + np.arange(QUERY_BLOCK))[keep]  # one copy
        got = jax.device_get(result)
        for out, part in zip(outs, got[:3]):
            out[rows[keep]] = part.reshape((size * QUERY_BLOCK,) + out.shape[1:])[source]
        if vectors is not None:
            vectors[0][vectors[1][rows[keep]]] = got[3].reshape(-1, k, 3)[source]
    return outs


def _batch_sharding(batch: KnnBatch, sharding):
    """The batch's shardings: block fields split over devices, the table replicated."""
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return dataclasses.replace(
        jax.tree.map(lambda _: sharding, batch), table=replicated)


def _block_rows(p: Plan, blocks: np.ndarray, size: int, devices: int):
    """Where a call's blocks land: sorted rows (blocks, Q) of their queries, the mask
    of real queries (blocks, Q), and each block's slot in the flattened (D * P) output
    (`pack` puts block i in device row i % D, column i // D)."""
    i = np.arange(len(blocks))
    slots = (i % devices) * (size // devices) + i // devices
    rows = p.offset[p.block_structure[blocks]][:, None] + p.block_atoms[blocks]
    keep = np.arange(QUERY_BLOCK) < p.block_queries[blocks][:, None]
    return rows, keep, slots


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
      sharding: optional NamedSharding over a 1-D mesh; each call's blocks are
        split over its devices.
      progress: called with the number of atoms finished after each pass.
    Returns:
      One Neighbours per structure, each proven exact.
    """
    k = check_k(k)
    if len(lattices) != len(fracs):
        raise errors.FeaturizeError("lattices and fracs differ in length")
    for lattice, frac in zip(lattices, fracs):
        validate_cell(lattice, frac)
    if not lattices:
        return []
    images = images_needed(np.stack(lattices), [len(f) for f in fracs], k)
    if np.any(images > MAX_BLOCK_CANDIDATES):
        bad = int(np.argmax(images > MAX_BLOCK_CANDIDATES))
        check_images(lattices[bad], len(fracs[bad]), k)
    sizes = np.array([len(f) for f in fracs], np.int64)
    out = _Results(sizes, k)
    # One table size for every pass, so a retry reuses the compiled programs.
    rows = int(_next_power_of_two(sizes.sum() + QUERY_BLOCK))
    pending, radii, asked, compiled = np.arange(len(sizes)), None, None, set()
    while pending.size:
        p = plan([lattices[i] for i in pending], [fracs[i] for i in pending], k, radii, asked)
        _check_block_candidates(p, pending, k)
        vectors = (out.vec, out.destination(p, pending))
        done, (pending, radii, asked) = out.collect(
            p, *run_plan(p, k, budget, sharding, rows, compiled, vectors), pending)
        if progress is not None:
            progress(done)
    return [Neighbours(out.dist[a : a + n], out.idx[a : a + n], float(r), out.vec[a : a + n])
            for a, n, r in zip(out.starts, sizes, out.radius)]


def _check_block_candidates(p: Plan, which: np.ndarray, k: int) -> None:
    """FeaturizeError naming the structure (its index in the caller's list) whose blocks
    would hold more than MAX_BLOCK_CANDIDATES candidates (a retry's grown radius)."""
    too_many = p.block_candidates > MAX_BLOCK_CANDIDATES
    if too_many.any():
        b = int(np.flatnonzero(too_many)[0])
        s = int(p.block_structure[b])
        raise errors.FeaturizeError(
            f"structure {int(which[s])}: the search for k = {k} neighbours needs "
            f"{int(p.block_candidates[b])} candidates per block (limit {MAX_BLOCK_CANDIDATES}, "
            f"{int(np.prod(p.image_counts[s]))} lattice images): atoms too unevenly spread "
            f"or cell too anisotropic")


def featurize_isolated(structures: Sequence[cif.Structure], k: int, **kwargs
                       ) -> tuple[list, list[Neighbours], list[cif.Skip]]:
    """featurize that skips what it cannot featurise instead of failing the batch.

    Returns (the structures featurised, their Neighbours, a Skip with the reason for each
    other one). A failing batch is split in halves until the structure at fault is alone.
    """
    from cryknn import cif

    good, skips = split_featurizable(structures, k)
    if not good:
        return [], [], skips
    try:
        return good, featurize(good, k, **kwargs), skips
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

    def destination(self, p: Plan, which: np.ndarray) -> np.ndarray:
        """(A,) row of the results (caller order) of each sorted row of plan p; which:
        (S,) caller index of each plan structure."""
        owner = np.repeat(np.arange(len(p.num_atoms)), p.num_atoms)
        return self.starts[which[owner]] + p.order - p.offset[owner]

    def collect(self, p: Plan, dist: np.ndarray, idx: np.ndarray, bound: np.ndarray,
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
            np.arange(QUERY_BLOCK) < p.block_queries[:, None]]
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
