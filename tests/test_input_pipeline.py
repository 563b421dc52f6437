"""From atom tables to training data (cryknn.input_pipeline): element choice, atom
selection, class weights and repeats, and the batchers' coverage of every atom."""

from __future__ import annotations

import numpy as np
import pytest

from cryknn import config as config_lib
from cryknn import errors
from cryknn import input_pipeline
from tests import toy_data


def test_choose_and_select_elements():
    counts = np.zeros(119, np.int64)
    counts[[1, 6, 8, 30]] = [500, 900, 300, 20]
    assert input_pipeline.choose_elements(counts, num_elements=3) == [6, 1, 8]
    assert input_pipeline.choose_elements(counts, elements="Zn,C") == [30, 6]
    with pytest.raises(errors.SelectionError, match="only 4 elements"):
        input_pipeline.choose_elements(counts, num_elements=5)
    with pytest.raises(errors.SelectionError, match="no training atoms of Li"):
        input_pipeline.choose_elements(counts, elements="C,Li")
    z = np.array([6] * 50 + [1] * 10 + [17] * 5)
    idx = input_pipeline.select_atoms(z, [6, 1], max_per_element=20, seed=0)
    assert np.sum(z[idx] == 6) == 20 and np.sum(z[idx] == 1) == 10 and not np.any(z[idx] == 17)


def test_class_weights_modes_and_normalisation():
    counts = np.array([900, 90, 10])
    for mode in config_lib.CLASS_WEIGHTINGS:
        w = input_pipeline.class_weights(counts, mode)
        assert np.isclose((w * counts).sum(), counts.sum()), mode
    w = input_pipeline.class_weights(counts, "inverse_frequency")
    np.testing.assert_allclose(w * counts, (w * counts)[0])  # each class the same total
    np.testing.assert_allclose(input_pipeline.class_weights(counts, "none"), 1.0)


def test_class_weights_soft_cap_matches_a_hard_cap_in_expectation():
    counts = np.array([100000, 4000, 500])
    soft = input_pipeline.class_weights(counts, "sqrt_inverse_frequency", cap=40000)
    hard = input_pipeline.class_weights(np.minimum(counts, 40000), "sqrt_inverse_frequency")
    # Each class's share of the loss is what it would be with at most 40000 atoms of it.
    np.testing.assert_allclose(soft * counts / (soft * counts).sum(),
                               hard * np.minimum(counts, 40000)
                               / (hard * np.minimum(counts, 40000)).sum(), rtol=1e-6)


def test_class_repeats_bring_rare_classes_back_up_to_the_limit():
    counts = np.array([100000, 20000, 2000, 10])
    np.testing.assert_allclose(input_pipeline.class_repeats(counts, 40000),
                               [1.0, 2.0, input_pipeline.MAX_REPEAT, input_pipeline.MAX_REPEAT])
    np.testing.assert_allclose(input_pipeline.class_repeats(counts, None), 1.0)


def _atoms(k=4):
    table = toy_data.toy_features((1, 6, 8), 30, k, atoms_per_structure=7, seed=4)
    labels = input_pipeline.label_table([1, 6, 8])
    rows = np.arange(len(table))[::2]  # half the atoms carry a loss
    return input_pipeline.LabelledAtoms(table, rows, labels[table.atomic_number[rows]])


@pytest.mark.parametrize("reads", ["atoms", "graph"])
def test_evaluation_batches_hold_every_selected_atom_once(reads):
    atoms = _atoms()
    spec = config_lib.InputSpec(4, hops=2 if reads == "graph" else 0, reads=reads)
    batcher = input_pipeline.batches_for(spec, 64, devices=2, local_devices=2)
    seen = np.concatenate([position[position >= 0].ravel()
                           for _, position in batcher.evaluation(atoms)])
    assert sorted(seen.tolist()) == list(range(len(atoms)))


def test_graph_epochs_repeat_structures_of_rare_classes():
    atoms = _atoms()
    spec = config_lib.InputSpec(4, hops=2, reads="graph")
    repeats = np.array([1.0, 1.0, 3.0])  # every structure holding O comes back 3 times
    batcher = input_pipeline.GraphBatches(spec, 64, 1, repeats)
    plain = input_pipeline.GraphBatches(spec, 64, 1)
    count = lambda b: sum(float(batch["mask"].sum())  # noqa: E731
                          for batch in b.epoch(atoms, seed=0, epoch=0))
    with_o = sum(1 for u in batcher.units(atoms) if (atoms.labels[u.loss] == 2).any())
    assert with_o > 0
    assert count(batcher) > count(plain)
    for batch in batcher.epoch(atoms, seed=0, epoch=0):
        assert batch["label"].shape == batch["mask"].shape == (1, 64)
