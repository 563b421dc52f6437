"""The device kernel of the exact periodic k-NN search: one block of queries against its
candidate slots, then a loop over groups of vmapped blocks (JAX, jit-compiled).

A block's input is a `KnnBatch` row laid out by `cryknn.knn_calls.pack` from a
`cryknn.knn_plan.Plan`; this module imports neither and works for any block size Q.

Candidates beyond the radius (tested against the radius inflated like the image box,
so rounding drops none within it) are set to +inf before the top-k: they could not make
a result proven exact, and as +inf they never enter top_k's heap, which is most of its
cost. Slots 0 ... k of any block with k + 1 real candidates give a proven upper bound
on each query's k-th distance, which the host uses to size a retry.

Arithmetic is float32 with coordinates relative to the query atom (the fractional
difference), which keeps the error near 1e-6 angstrom. The lattice arrives rotated to
a lower-triangular basis (distances do not change), which saves three of the nine
multiply-adds per candidate.

Displacement vectors (neighbour image minus atom, angstrom, in the caller's unrotated
frame) come from the same search: top_k picks candidate slots, and only for the k picked
slots the kernel recomputes the image (the same float32 operations as the distance, plus
the slot's integer step) and multiplies it by the original cell. So a vector always
belongs to its distance and index, ties included, at a cost of k (not C) per query.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


def _static():
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnnBatch:
    """A padded batch of query blocks, the device kernel's input (a pytree).

    Blocks are laid out (D, P): D devices (1 unsharded), P blocks each; the first
    num_blocks[d] blocks of row d are real. Each block is Q (`knn_plan.QUERY_BLOCK`)
    consecutive sorted atoms of one structure; its C = `slots` candidate slots are the
    pairs (window atom w, image m) at slot m * window_count + w.

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
      slots: C, candidate slots per block (static, >= k).
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
    slots: int = _static()
    group: int = _static()


def _candidates(table, block: KnnBatch):
    """Fractional position, local atom index and image step of each candidate slot.

    Returns: position (C, 3) float32, atom (C,) int32, step (C, 3) int32, valid (C,).
    """
    counts, count, n = block.image_counts, block.window_count, block.num_atoms
    slot = jnp.arange(block.slots, dtype=jnp.int32)
    image = slot // jnp.maximum(count, 1)
    atom = (block.window_start + slot - image * count) % n
    step = jnp.stack([image // (counts[1] * counts[2]), (image // counts[2]) % counts[1],
                      image % counts[2]], axis=-1)
    valid = image < counts[0] * counts[1] * counts[2]
    return table[block.offset + atom], atom, step, valid


def _knn_block(table, block: KnnBatch):
    """k-NN of one block of queries against its candidate slots.

    Args:
      table: (T, 3) float32, see KnnBatch.
      block: one block of a KnnBatch: its per-block fields without the (D, P) axes
        (lattice (3, 3), query_atoms (Q,), radius (), ...); table, num_queries and
        num_blocks None.
    Returns:
      distances (Q, k) float32 ascending (+inf beyond the radius), neighbour local
      sorted index (Q, k) int32, the retry bound (Q,) float32 (see _retry_bound) and
      the displacement vectors (Q, k, 3) float32 (see _selected_vectors).
    """
    lattice, frac_radius, k = block.lattice, block.frac_radius, block.k
    near, atom, step, valid = _candidates(table, block)
    query = table[block.offset + block.query_atoms]  # (Q, 3)
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
    is_self = (atom[None, :] == block.query_atoms[:, None]) & self_step[None, :]
    # Candidates beyond the radius cannot make a result proven exact; as +inf they
    # never enter top_k's heap, which is most of its cost (a heap entry costs
    # ~log k mispredicted comparisons, a rejected candidate one predictable one).
    radius = block.radius
    d2 = jnp.where(valid[None, :] & ~is_self & (d2 <= radius * radius), d2, jnp.inf)
    neg_d2, slot = jax.lax.top_k(-d2, k)
    vectors = _selected_vectors(near[slot], step[slot], query, frac_radius, block.cell)
    return (jnp.sqrt(-neg_d2), atom[slot],
            jnp.sqrt(_retry_bound(raw, block.image_counts, block.window_count, k)), vectors)


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
    devices, per_device, q = batch.query_atoms.shape
    g, k = batch.group, batch.k
    # The fields a block reads, each with the (D, P) block axes; the table is shared and
    # the block counts have no block axis (padding queries are computed, then dropped).
    blocks = dataclasses.replace(batch, table=None, num_queries=None, num_blocks=None)
    run = jax.vmap(jax.vmap(functools.partial(_knn_block, batch.table)))

    def step(i, out):
        part = jax.tree.map(lambda f: jax.lax.dynamic_slice_in_dim(f, i * g, g, axis=1),
                            blocks)
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, r, i * g, axis=1)
                     for o, r in zip(out, run(part)))

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
    along a mesh axis (`neighbours.data_parallel_sharding`), each device loops over its
    own blocks against the replicated table (shard_map: no collectives).

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
