"""On-device graph batches and the graph model: receptive fields against a brute-force
walk, crops that give every loss atom exactly its whole-crystal prediction, invariance to
rotations and to the order of atoms and neighbours, and directions that matter."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from cryknn import cif
from cryknn import config as config_lib
from cryknn import errors
from cryknn import features
from cryknn import graph_batch
from cryknn import input_pipeline
from cryknn import models
from tests.conftest import NACL_CIF, make_cif, random_rotation
from tests import toy_data

K = 5


def _walk(neighbour_index, start, depth):
    """Brute force: every row reachable from `start` in at most `depth` steps."""
    seen, frontier = {int(start)}, {int(start)}
    for _ in range(depth):
        frontier = {int(j) for i in frontier for j in neighbour_index[i]} - seen
        seen |= frontier
    return seen


@pytest.fixture(scope="module")
def table():
    return toy_data.toy_features((1, 6, 8, 29), 40, K, seed=2, atoms_per_structure=37)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_receptive_field_is_the_brute_force_walk(table, depth):
    rows = np.array([3, 50, 51, 140])
    inside = graph_batch.receptive_field(table.neighbour_index, rows, depth, len(table))
    expected = set().union(*[_walk(table.neighbour_index, r, depth) for r in rows])
    assert set(np.flatnonzero(inside).tolist()) == expected


@pytest.mark.parametrize("capacity", [1000, 34, 12])
def test_units_hold_every_loss_atom_once_with_its_whole_field(table, capacity):
    # Every second atom from each structure's second: neighbours sit below a crop's rows.
    rows = np.flatnonzero((np.arange(len(table)) - 37 * table.structure_index) % 2 == 1)
    depth = 1 if capacity == 12 else 2
    units = graph_batch.make_units(table.neighbour_index, table.structure_index, rows, depth,
                                   capacity)
    positions = np.concatenate([u.loss for u in units])
    assert sorted(positions.tolist()) == list(range(len(rows)))
    for u in units:
        assert len(u.nodes) <= capacity and len(set(u.nodes.tolist())) == len(u.nodes)
        np.testing.assert_array_equal(u.nodes[:len(u.loss)], rows[u.loss])
        for r in rows[u.loss]:
            assert _walk(table.neighbour_index, r, depth) <= set(u.nodes.tolist())
    if capacity == 1000:  # every structure fits: one unit per structure, no crops
        assert len(units) == len(np.unique(table.structure_index[rows]))
    else:
        assert len(units) > len(np.unique(table.structure_index[rows]))


def test_a_field_larger_than_a_pack_is_a_clear_error(table):
    with pytest.raises(errors.ConfigError, match="receptive field"):
        graph_batch.make_units(table.neighbour_index, table.structure_index, np.array([0]),
                               3, 8)


def test_packs_are_filled_first_fit():
    """Each unit goes into the first pack with room: the 4 fills what the 6 left, the 3
    what the 7 left (closing a pack whenever the next unit does not fit takes three)."""
    units = [graph_batch.Unit(np.arange(n), np.arange(1)) for n in (6, 7, 4, 3)]
    packs = graph_batch.pack_units(units, 10)
    assert [[len(u.nodes) for u in pack] for pack in packs] == [[6, 4], [7, 3]]
    assert [len(p) for p in graph_batch.pack_units(units, 7)] == [1, 1, 2]


def test_pack_arrays_point_inside_the_pack(table):
    units = graph_batch.make_units(table.neighbour_index, table.structure_index,
                                   np.arange(60), 2, 120)
    pack = graph_batch.pack_units(units, 255)[0]
    scratch = np.full(len(table), -1, np.int64)
    arrays = graph_batch.pack_arrays(table, pack, 256, with_elements=True, scratch=scratch)
    assert np.all(scratch == -1)  # the scratch map is left clean for the next pack
    nodes = np.concatenate([u.nodes for u in pack])
    index = arrays.inputs.neighbour_index
    for slot, row in enumerate(nodes):  # each neighbour slot holds that neighbour's row
        for j, target in enumerate(index[slot]):
            if target != 255:
                assert nodes[target] == table.neighbour_index[row, j]
    np.testing.assert_array_equal(arrays.inputs.distances[:len(nodes)], table.distances[nodes])
    assert np.all(arrays.inputs.site[len(nodes):] == -1)


def _model(k=K, **overrides):
    overrides = {"directions": True, **overrides}
    config = config_lib.Config(model="graph", k=k, width=16, **overrides)
    spec = config_lib.input_spec(config)
    model = models.create_model(config, 4)
    params = models.init_params(model, k, jax.random.key(1), input_pipeline.example_inputs(spec))
    return model, params, spec


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    """model.apply compiled, once per model configuration in this module (equal modules
    apply alike): op-by-op dispatch over many small packs is what made these tests slow."""
    return jax.jit(model.apply)


def _logits(model, params, spec, table, rows, largest):
    out = np.zeros((len(rows), model.num_classes), np.float32)
    for pack in graph_batch.inference_packs(table, rows, spec.receptive_hops, largest,
                                            with_elements=spec.neighbour_elements):
        logits = np.asarray(_jitted_apply(model)({"params": params},
                                                 graph_batch.stack([pack])[0])["logits"])[0]
        keep = pack.loss_position >= 0
        out[pack.loss_position[keep]] = logits[keep]
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_crops_give_every_atom_its_whole_crystal_prediction(table, masked):
    """Small packs force crops of each structure; every loss atom's logits match those of
    one pack holding everything (edges leaving a crop only feed atoms no loss atom reads)."""
    model, params, spec = _model(hops=2, neighbour_elements=masked)
    rows = np.arange(0, len(table), 2)
    whole = _logits(model, params, spec, table, rows, 1 << 12)
    cropped = _logits(model, params, spec, table, rows, 64)
    np.testing.assert_allclose(cropped, whole, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_packs_in_one_batch_give_what_each_pack_gives_alone(table, masked):
    """A batch of several packs (run per pack, as sharded over devices) and each of its
    packs alone (run without the pack axis, as on one device) give the same logits."""
    model, params, spec = _model(hops=2, neighbour_elements=masked)
    packs = list(graph_batch.inference_packs(table, np.arange(len(table)), spec.receptive_hops,
                                             64, with_elements=masked))
    packs = [p for p in packs if p.inputs.distances.shape == packs[0].inputs.distances.shape]
    assert len(packs) >= 3
    together = np.asarray(_jitted_apply(model)({"params": params},
                                               graph_batch.stack(packs)[0])["logits"])
    for g, pack in enumerate(packs):
        alone = np.asarray(_jitted_apply(model)({"params": params},
                                                graph_batch.stack([pack])[0])["logits"])
        np.testing.assert_allclose(together[g], alone[0], rtol=1e-5, atol=1e-5)


def test_logits_are_invariant_to_rotations_and_atom_order(table):
    model, params, spec = _model(hops=2)
    rows = np.arange(len(table))
    base = _logits(model, params, spec, table, rows, 1 << 12)
    rotated = dataclasses.replace(table, neighbour_vector=(
        table.neighbour_vector @ random_rotation(3).T).astype(np.float32))
    np.testing.assert_allclose(_logits(model, params, spec, rotated, rows, 1 << 12), base,
                               rtol=1e-4, atol=1e-4)
    reordered = rows[::-1].copy()  # another order of loss atoms, so other slots
    np.testing.assert_allclose(_logits(model, params, spec, table, reordered, 1 << 12),
                               base[::-1], rtol=1e-5, atol=1e-5)


def test_logits_are_invariant_to_the_order_of_tied_neighbours():
    """Neighbours at equal distance come in any order: messages are pooled, not listed
    (the node encoder reads the sorted distances, which ties leave unchanged)."""
    model, params, spec = _model(k=4, hops=2)
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / 3 ** 0.5
    rows = np.array([0])
    base = _logits(model, params, spec, _shell(tetra), rows, 64)
    again = _logits(model, params, spec, _shell(tetra[[2, 0, 3, 1]]), rows, 64)
    np.testing.assert_allclose(again, base, rtol=1e-5, atol=1e-6)


def _shell(directions):
    """A table of one central atom (row 0) whose neighbours sit at `directions` (unit
    vectors, all at 2 A) and whose neighbours see only the centre."""
    k = len(directions)
    d = np.full((k + 1, k), 2.0, np.float32)
    index = np.zeros((k + 1, k), np.int32)
    index[0] = np.arange(1, k + 1)
    vectors = np.zeros((k + 1, k, 3), np.float32)
    vectors[0] = 2.0 * np.asarray(directions, np.float32)
    vectors[1:, :, :] = -vectors[0][:, None, :]
    return features.AtomTable(d, index, np.full(k + 1, 6, np.int32),
                              np.zeros(k + 1, np.int32), np.array([b"C"] * (k + 1)),
                              np.array(["shell:shell"]), neighbour_vector=vectors)


def test_directions_tell_a_square_from_a_tetrahedron():
    """Same four distances: only the shell's shape differs."""
    square = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / 3 ** 0.5
    rows = np.array([0])
    for directions, differs in ((True, True), (False, False)):
        model, params, spec = _model(k=4, hops=1, directions=directions)
        a = _logits(model, params, spec, _shell(square), rows, 64)
        b = _logits(model, params, spec, _shell(tetra), rows, 64)
        assert (not np.allclose(a, b, atol=1e-6)) == differs


def test_scoring_a_cif_needs_no_padding_to_the_training_pack(tmp_path):
    found, _ = cif.read_cif_text(NACL_CIF, "nacl")
    table = features.atom_table(found, K)
    packs = list(graph_batch.inference_packs(table, np.arange(len(table)), 2, 4096,
                                             with_elements=False))
    assert len(packs) == 1 and packs[0].inputs.distances.shape[0] == graph_batch.MIN_BUCKET
    big = make_cif([(f"C{i}", "C", (i * 0.137) % 1, (i * 0.291) % 1, (i * 0.413) % 1)
                    for i in range(70)], cell="12 12 12 90 90 90", block="big")
    table = features.atom_table(cif.read_cif_text(big, "big")[0], K)
    sizes = [p.inputs.distances.shape[0] for p in graph_batch.inference_packs(
        table, np.arange(len(table)), 2, 4096, with_elements=False)]
    assert sizes == [128]
