"""Whole-structure graph batches for the on-device graph model.

A batch is `G` packs of `N` node slots (static shapes: programs compile once per pack
size). A pack holds whole structures, or crops of structures too big for one pack; every
atom whose prediction is wanted (a *loss atom*: training atoms under the per-element cap,
or every atom to score) brings its receptive field: every atom within `depth` hops along
the k-NN graph, so its final state is exactly what it would be in the whole crystal. Edges
leaving a crop point at the pack's last slot (the sink), which is never a loss atom and
only feeds atoms outside every loss atom's receptive field.

Building a batch is numpy over whole index arrays: receptive fields grow by gathering the
neighbour index of the frontier, packs take units (structures or crops) in a shuffled
order; the only Python loops run over units and packs, never over atoms. Every gather of
node states happens on the device (`message_passing.GraphLayer`), and each atom's state is computed
once per hop and shared by every atom that reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import flax.struct
import numpy as np

from cryknn import errors

# Smallest pack of an inference bucket; buckets double from here (few compiled shapes).
MIN_BUCKET = 64


@flax.struct.dataclass
class GraphInputs:
    """Model inputs of G packs of N node slots (a pytree; numpy or jax arrays).

    Attributes:
      distances: (G, N, k) float32 each node's ascending k-NN distances (angstrom).
      neighbour_index: (G, N, k) int32 slot of each neighbour in the same pack (N - 1, the
        sink, for a neighbour outside the pack).
      vectors: (G, N, k, 3) float32 displacement from the node to each neighbour's image.
      elements: (G, N) int32 atomic number of each node (masked-atom mode; else None).
      site: (G, N) int32 site of each node (masked-atom mode: atoms of one site never see
        each other's elements; -1 on empty slots; else None).
    """

    distances: np.ndarray
    neighbour_index: np.ndarray
    vectors: np.ndarray
    elements: np.ndarray | None = None
    site: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.distances.shape[-1])


@dataclasses.dataclass(frozen=True)
class Unit:
    """Atoms that go into one pack together: a structure's receptive field, or a crop.

    nodes: (n,) int64 table rows (loss atoms first, then context atoms).
    loss: (m,) int64 positions in the caller's selection of the loss atoms, which are
      nodes[:m].
    """

    nodes: np.ndarray
    loss: np.ndarray


def receptive_field(neighbour_index: np.ndarray, rows: np.ndarray, depth: int,
                    num_rows: int) -> np.ndarray:
    """(num_rows,) bool: the atoms within `depth` hops of `rows` along the k-NN graph.

    neighbour_index: (A, k) table row of each atom's neighbours.
    """
    inside = np.zeros(num_rows, bool)
    inside[rows] = True
    frontier = np.unique(rows)
    for _ in range(depth):
        reached = np.unique(neighbour_index[frontier].ravel())
        frontier = reached[~inside[reached]]
        inside[frontier] = True
    return inside


def make_units(neighbour_index: np.ndarray, structure_index: np.ndarray, rows: np.ndarray,
               depth: int, capacity: int) -> list[Unit]:
    """Units holding every selected atom `rows` (R,) and its receptive field, each at most
    `capacity` nodes: one per structure, or crops of a structure whose field is larger.

    Raises ConfigError when one atom's receptive field alone exceeds the capacity.
    """
    rows = np.asarray(rows, np.int64)
    if not len(rows):
        return []
    inside = receptive_field(neighbour_index, rows, depth, len(structure_index))
    field_rows = np.flatnonzero(inside)
    field_of = structure_index[field_rows]
    order = np.argsort(structure_index[rows], kind="stable")
    loss_of = structure_index[rows[order]]
    structures, loss_start = np.unique(loss_of, return_index=True)
    loss_end = np.append(loss_start[1:], len(order))
    field_start = np.searchsorted(field_of, structures)
    field_end = np.searchsorted(field_of, structures, side="right")
    units = []
    is_loss = np.zeros(len(structure_index), bool)
    for s, a, b, fa, fb in zip(structures, loss_start, loss_end, field_start, field_end):
        positions = order[a:b]
        if fb - fa <= capacity:
            nodes = field_rows[fa:fb]
            is_loss[rows[positions]] = True
            nodes = np.concatenate([rows[positions], nodes[~is_loss[nodes]]])
            is_loss[rows[positions]] = False
            units.append(Unit(nodes, positions))
        else:
            units.extend(_crops(neighbour_index, rows, positions, depth, capacity))
    return units


def _crops(neighbour_index: np.ndarray, rows: np.ndarray, positions: np.ndarray, depth: int,
           capacity: int) -> list[Unit]:
    """Crops of one structure's loss atoms (at `positions` of `rows`), each with its whole
    receptive field in at most `capacity` nodes.

    Loss atoms are ordered by reverse Cuthill-McKee on the structure's k-NN graph, so
    consecutive atoms are near each other and a run of them shares most of its field;
    runs halve until their field fits.
    """
    positions = positions[_bandwidth_order(neighbour_index, rows[positions])]
    out, pending = [], [positions]
    while pending:
        chunk = pending.pop()
        inside = receptive_field(neighbour_index, rows[chunk], depth, len(neighbour_index))
        nodes = np.flatnonzero(inside)
        if len(nodes) <= capacity:
            context = nodes[~np.isin(nodes, rows[chunk])]
            out.append(Unit(np.concatenate([rows[chunk], context]), chunk))
        elif len(chunk) == 1:
            raise errors.ConfigError(
                f"one atom's receptive field has {len(nodes)} atoms, more than a pack of "
                f"{capacity}: raise --batch_size or lower --k / --hops")
        else:
            half = len(chunk) // 2
            pending += [chunk[half:], chunk[:half]]
    return out


def _bandwidth_order(neighbour_index: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(R,) permutation of `rows` (atoms of one structure) keeping k-NN neighbours close."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    neighbours = neighbour_index[rows].ravel()  # atoms of the structure beyond `rows` too
    first = int(min(rows.min(), neighbours.min()))
    span = int(max(rows.max(), neighbours.max())) - first + 1
    i = np.repeat(rows - first, neighbour_index.shape[1])
    j = neighbours - first
    graph = csr_matrix((np.ones(len(i), np.int8), (i, j)), shape=(span, span))
    order = reverse_cuthill_mckee((graph + graph.T).tocsr(), symmetric_mode=True)
    rank = np.empty(span, np.int64)
    rank[order] = np.arange(span)
    return np.argsort(rank[rows - first], kind="stable")


def pack_units(units: list[Unit], capacity: int) -> list[list[Unit]]:
    """Units packed first fit, in the given order: each goes into the first pack with room
    for it (a new one when none has). Packs keep their order of opening; next fit (close a
    pack when the next unit does not fit) left ~14 % of the slots of CoRE MOF packs empty."""
    packs: list[list[Unit]] = []
    room = np.zeros(0, np.int64)  # free slots of each pack
    for unit in units:
        size = len(unit.nodes)
        fits = np.flatnonzero(room >= size)
        if len(fits):
            at = int(fits[0])
        else:
            at = len(packs)
            packs.append([])
            room = np.append(room, capacity)
        packs[at].append(unit)
        room[at] -= size
    return packs


@dataclasses.dataclass(frozen=True)
class PackArrays:
    """One pack's arrays (N node slots, the last one the sink).

    inputs: GraphInputs with G = 1 removed (shapes (N, ...)).
    loss_position: (N,) int64 position in the selection of each loss node, -1 elsewhere.
    """

    inputs: GraphInputs
    loss_position: np.ndarray


def pack_arrays(table, units: list[Unit], size: int, *, with_elements: bool,
                scratch: np.ndarray) -> PackArrays:
    """The arrays of `units` in a pack of `size` slots.

    table: a `features.AtomTable` with neighbour vectors (and sites when
    with_elements). scratch: (A,) int64 all -1, the table row -> slot map (restored to -1).
    """
    nodes = np.concatenate([u.nodes for u in units])
    n = len(nodes)
    if n > size - 1:
        raise ValueError(f"{n} nodes do not fit a pack of {size} slots")
    scratch[nodes] = np.arange(n)
    local = scratch[table.neighbour_index[nodes]]
    scratch[nodes] = -1
    k = table.k
    index = np.full((size, k), size - 1, np.int32)
    index[:n] = np.where(local >= 0, local, size - 1)
    distances = np.full((size, k), 1.0, np.float32)  # empty slots: any finite geometry
    distances[:n] = table.distances[nodes]
    vectors = np.zeros((size, k, 3), np.float32)
    vectors[:n] = table.neighbour_vector[nodes]
    vectors[n:, :, 0] = 1.0
    loss_position = np.full(size, -1, np.int64)
    offset = 0
    for u in units:
        loss_position[offset:offset + len(u.loss)] = u.loss
        offset += len(u.nodes)
    elements = site = None
    if with_elements:
        elements = np.zeros(size, np.int32)
        elements[:n] = table.atomic_number[nodes]
        site = np.full(size, -1, np.int32)
        site[:n] = _sites(table)[nodes]
    inputs = GraphInputs(distances, index, vectors, elements, site)
    return PackArrays(inputs, loss_position)


def _sites(table) -> np.ndarray:
    return table.site if table.site is not None else np.arange(len(table))


def stack(packs: list[PackArrays]) -> tuple[GraphInputs, np.ndarray]:
    """G packs -> (GraphInputs with a leading G axis, (G, N) loss positions)."""
    import jax

    inputs = jax.tree.map(lambda *xs: np.stack(xs), *[p.inputs for p in packs])
    return inputs, np.stack([p.loss_position for p in packs])


def filler(size: int, k: int, packs: int = 1, *, with_elements: bool = False) -> GraphInputs:
    """Inputs of `packs` empty packs (init shapes; a process out of packs steps along)."""
    index = np.full((packs, size, k), size - 1, np.int32)
    vectors = np.zeros((packs, size, k, 3), np.float32)
    vectors[..., 0] = 1.0
    return GraphInputs(np.ones((packs, size, k), np.float32), index, vectors,
                       np.zeros((packs, size), np.int32) if with_elements else None,
                       np.full((packs, size), -1, np.int32) if with_elements else None)


def empty_pack(size: int, k: int, *, with_elements: bool) -> PackArrays:
    """A pack of `size` empty slots (no loss atoms)."""
    import jax

    inputs = jax.tree.map(lambda x: x[0], filler(size, k, 1, with_elements=with_elements))
    return PackArrays(inputs, np.full(size, -1, np.int64))


def bucket(nodes: int, largest: int) -> int:
    """Pack size for an inference pack of `nodes` nodes: a power of two >= nodes + 1 (the
    sink), at least MIN_BUCKET, at most `largest`."""
    return min(largest, max(MIN_BUCKET, 1 << int(nodes).bit_length()))


def inference_packs(table, rows: np.ndarray, depth: int, largest: int, *,
                    with_elements: bool) -> Iterator[PackArrays]:
    """Packs scoring the atoms at `rows` (R,) of `table`, each in the smallest bucket that
    holds it; loss positions index `rows`."""
    units = make_units(table.neighbour_index, table.structure_index, rows, depth, largest - 1)
    scratch = np.full(len(table), -1, np.int64)
    for pack in pack_units(units, largest - 1):
        size = bucket(sum(len(u.nodes) for u in pack), largest)
        yield pack_arrays(table, pack, size, with_elements=with_elements, scratch=scratch)
