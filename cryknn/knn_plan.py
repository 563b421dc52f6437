"""Host-side planning of the exact periodic k-NN search (numpy, float64, vectorised over
structures): search radius, lattice images, sort order, query blocks and their windows,
candidate buckets.

Why the search is exact on any cell (no minimum-image shortcut):
  Let h_a be the interplanar spacing of axis a (cell volume over the area of the
  opposite face). A Cartesian vector v has fractional coordinate u_a with
  |u_a| <= |v| / h_a. So every neighbour within a radius r of atom i has
  |delta_a + t_a| <= R_a = r / h_a, where delta = frac_j - frac_i (both in [0, 1))
  and t is its integer lattice translation. The admissible t_a form an interval of
  length 2 R_a, i.e. at most S_a = floor(2 R_a) + 1 consecutive integers starting
  at t0_a = ceil(-R_a - delta_a). Enumerating those S_1 * S_2 * S_3 images per atom
  pair finds *every* point within r; if the k-th distance found is <= r, no unseen
  point can be closer and that atom's result is exact (whatever other atoms do).
  The box is inflated by BOX_SLACK so float rounding drops no candidate within r.

Only atoms that can be within the radius are examined: each structure's atoms are
sorted along the axis with the narrowest reach, and each block of QUERY_BLOCK
consecutive queries looks at the cyclic run of atoms within reach of it (its window).
A block's candidates are (window atom, image) pairs, flattened into one axis of C slots.

Why blocks, not structures, are the unit of work (profiled on CoRE MOF, pyxtal and
COD cells; see experiments/profile_featurize.py): XLA's CPU top_k (a scalar partial
sort) costs several ns per candidate while the distance itself costs well under one,
so the time is the number of *padded* candidates, plus the top_k heap entries (each
~log k mispredicted comparisons), which the +inf beyond r keeps near k per query.
Padding whole structures to (atoms, window, images) buckets tripled that number;
padding each block's flat candidate count to the next of {2^j, 1.5 * 2^j} wastes about
a fifth, and the compiled programs depend only on (C, k), not on the structure sizes,
so a corpus compiles a handful of small programs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from cryknn import errors
from cryknn import geometry

# Buckets holding fewer than this fraction of a pass's blocks merge upward.
RARE_BUCKET = 0.03
# The first radius holds 1 + RADIUS_MARGIN / sqrt(k + 1) times the k + 1 points
# expected from the density: a Poisson count's relative spread falls as
# 1/sqrt(k + 1), so large k needs little margin. Atoms that miss are retried alone,
# but a retry pass has a fixed cost (~3 ms), which small corpora notice: 3.0 (not
# 2.3) spares pyxtal's 100 cells a retry at k=5 (+35%) for ~2-5% elsewhere.
RADIUS_MARGIN = 3.0
# Relative inflation of the enumeration box so float rounding never drops a
# candidate that sits on the radius boundary.
BOX_SLACK = 1e-5
QUERY_BLOCK = 32  # queries per block; smaller blocks give narrower windows
MIN_CANDIDATES = 32  # smallest candidate bucket
# Candidate slots (atom, image) of one query block at most: a block takes ~2 KB per slot
# on the device (32 queries, ~15 float32 temporaries each), so 2^18 slots are ~0.5 GB.
# Real cells need < 2^16 even at k = 100; a cell that is a needle or a sheet (a = 1e-6 A,
# b = c = 1e6 A) would need billions.
MAX_BLOCK_CANDIDATES = 2**18


def images_needed(lattices: np.ndarray, num_atoms, k: int) -> np.ndarray:
    """(S,) lattice images the first search for k neighbours takes per structure (as
    `plan` grows its radius until the box can hold k + 1 points); computed in float64,
    nothing allocated per image. lattices (S, 3, 3), num_atoms (S,)."""
    lattices = np.asarray(lattices, np.float64).reshape(-1, 3, 3)
    num_atoms = np.asarray(num_atoms, np.float64).reshape(-1)
    spacings = geometry.interplanar_spacings(lattices)
    radius = initial_radius(lattices, num_atoms, k)
    for _ in range(200):
        frac_radius = np.minimum(radius[:, None] * (1.0 + BOX_SLACK) / spacings, 1e15)
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


def next_power_of_two(n):
    """Elementwise smallest power of two >= n (n >= 1)."""
    n = np.asarray(n, np.int64)
    return np.left_shift(1, np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64))


def candidate_bucket(count, k: int):
    """Padded candidate slots per block: the next of {2^j, 1.5 * 2^j}, > max(count, k).

    Half-octave steps waste a fifth on average; each bucket is one compiled program.
    """
    count = np.maximum(np.maximum(count, k + 1), MIN_CANDIDATES)
    upper = next_power_of_two(count)
    return np.where(count <= upper * 3 // 4, upper * 3 // 4, upper)


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
            counts = _image_counts(radii[:, None] * (1.0 + BOX_SLACK) / spacings)
            short = np.prod(counts, axis=1) * num_atoms < k + 1
            if not short.any():
                break
            radii = np.where(short, radii * 1.5, radii)
    radii = np.asarray(radii, np.float64)
    frac_radius = radii[:, None] * (1.0 + BOX_SLACK) / spacings
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


def oversized_structures(p: Plan, k: int) -> dict[int, str]:
    """{plan structure: reason} for each structure with a block of more than
    MAX_BLOCK_CANDIDATES candidates (a retry's grown radius), in plan order."""
    reasons = {}
    for b in np.flatnonzero(p.block_candidates > MAX_BLOCK_CANDIDATES):
        s = int(p.block_structure[b])
        reasons.setdefault(s, (
            f"the search for k = {k} neighbours needs {int(p.block_candidates[b])} "
            f"candidates per block (limit {MAX_BLOCK_CANDIDATES}, "
            f"{int(np.prod(p.image_counts[s]))} lattice images): atoms too unevenly spread "
            f"or cell too anisotropic"))
    return reasons


def check_block_candidates(p: Plan, which: np.ndarray, k: int) -> None:
    """FeaturizeError naming the structure (its index in the caller's list) whose blocks
    would hold more than MAX_BLOCK_CANDIDATES candidates (a retry's grown radius)."""
    for s, reason in oversized_structures(p, k).items():
        raise errors.FeaturizeError(f"structure {int(which[s])}: {reason}")
