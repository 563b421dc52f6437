"""Device calls of the exact periodic k-NN search: a `knn_plan.Plan`'s blocks grouped by
candidate bucket, packed into padded `KnnBatch` calls of a few fixed sizes, dispatched to
`knn_kernel`, and their rows gathered back into the plan's sorted order.

Every call of a bucket has one size, so a bucket compiles once, and gathers its atoms
from one table of all the structures' sorted atoms; the kernel's device loop runs over
only the real blocks, so padding blocks cost no compute. Calls are all dispatched before
the first result is awaited.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cryknn.knn_kernel import KnnBatch, knn_kernel
from cryknn.knn_plan import (BOX_SLACK, QUERY_BLOCK, Plan, candidate_bucket,
                             merge_rare_buckets, next_power_of_two)

# Work per device call, counted in candidate (query, neighbour, image) triples.
DEFAULT_CALL_BUDGET = 2**23
# Triples per step of the device loop (memory: ~40 bytes each, so a few MB; a
# single block larger than this, e.g. a 2,000-atom cell at k=100, runs alone).
STEP_TRIPLES = 2**17
# Neighbours (query, k) per call: bounds the outputs (~1 MB) a padded call moves.
CALL_OUTPUTS = 2**17


def lower_triangular(lattices: np.ndarray) -> np.ndarray:
    """(S, 3, 3) rotations of lattice rows to lower-triangular form (same distances).

    With L^T = Q R, L Q = R^T: an orthogonal change of Cartesian frame.
    """
    _, r = np.linalg.qr(np.swapaxes(lattices, 1, 2))
    return np.swapaxes(r, 1, 2)


def call_shape(slots: int, k: int, budget: int, devices: int) -> tuple[int, int]:
    """(blocks per call, blocks per loop step) for candidate bucket `slots`.

    A call holds at most `budget` triples and CALL_OUTPUTS neighbours; a loop step
    about STEP_TRIPLES triples. Both are powers of two and the call a multiple of
    devices * step. Every call of a bucket has this size (padding blocks cost only
    their share of the outputs), so a bucket compiles once.
    """
    per_block = QUERY_BLOCK * slots
    group = _power_of_two_below(min(64, STEP_TRIPLES // per_block))
    size = _power_of_two_below(min(budget // per_block, CALL_OUTPUTS // (QUERY_BLOCK * k)))
    return max(size, group * devices), group


def _power_of_two_below(n: int) -> int:
    """Largest power of two <= n, at least 1."""
    return 1 << max(0, int(n).bit_length() - 1)


def pack(p: Plan, blocks: np.ndarray, size: int, slots: int, group: int, k: int,
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
        table=table,
        lattice=field(lower_triangular(p.lattice[s]), eye, np.float32, (3, 3)),
        frac_radius=field(p.frac_radius[s], 0.0, np.float32, (3,)),
        radius=field(p.radius[s] * (1.0 + BOX_SLACK), 0.0, np.float32),
        image_counts=field(p.image_counts[s], 1, np.int32, (3,)),
        offset=field(p.offset[s], 0, np.int32),
        num_atoms=field(p.num_atoms[s], 1, np.int32),
        query_atoms=field(p.block_atoms[blocks], 0, np.int32, (QUERY_BLOCK,)),
        num_queries=field(p.block_queries[blocks], 0, np.int32),
        window_start=field(p.window_start[blocks], 0, np.int32),
        window_count=field(p.window_count[blocks], 0, np.int32),
        num_blocks=num_blocks,
        cell=field(p.lattice[s], eye, np.float32, (3, 3)),
        k=k, slots=slots, group=group)


# Device table sizes. The kernel only reads each structure's own window of rows, so a
# table's size changes no result, only the copy to the device; yet every size is another
# compiled program per candidate bucket. A call of one small structure (the API in a loop)
# keeps a small power-of-two table (at most SMALL_TABLE_ROWS: copying a table hundreds of
# times its size would be much of such a call); any bigger call (a tool's chunk of files)
# gets at least MIN_TABLE_ROWS (384 KiB), so chunks of varied files share one table size:
# 300 mixed CIFs compiled 29 kernels with power-of-two tables from 64 rows up, 15 now.
SMALL_TABLE_ROWS = 1 << 10
MIN_TABLE_ROWS = 1 << 15


def table_rows(atoms: int) -> int:
    """Rows of the device table for `atoms` sorted atoms: a power of two with room for the
    QUERY_BLOCK padding rows, at least MIN_TABLE_ROWS above SMALL_TABLE_ROWS. Every pass
    of a featurisation takes the first pass's size, so a retry reuses the compiled
    programs."""
    rows = int(next_power_of_two(atoms + QUERY_BLOCK))
    return rows if rows <= SMALL_TABLE_ROWS else max(rows, MIN_TABLE_ROWS)


def device_table(p: Plan, rows: int, sharding) -> jax.Array:
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
    table = device_table(p, rows, sharding)
    buckets = merge_rare_buckets(candidate_bucket(p.block_candidates, k))
    if compiled:
        known = np.array(sorted(compiled))
        fits = np.searchsorted(known, buckets)
        buckets = np.where(fits < len(known), known[np.minimum(fits, len(known) - 1)], buckets)
    if compiled is not None:
        compiled.update(buckets.tolist())
    calls = []
    for slots in np.unique(buckets):
        todo = np.flatnonzero(buckets == slots)
        size, group = call_shape(int(slots), k, budget, devices)
        for begin in range(0, len(todo), size):
            blocks = todo[begin : begin + size]
            batch = pack(p, blocks, size, int(slots), group, k, table, devices)
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
