"""Masked-atom mode on dataset tables: sites come from the dataset (symmetry copies and
coincident same-element positions), and no atom's own element reaches its own logits."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from cryknn import cif
from cryknn import config as config_lib
from cryknn import features
from cryknn import graph_batch
from cryknn import input_pipeline
from cryknn import models
from tests.conftest import make_cif, symmetry_ops

# Three sites in P-1 (each atom has an inversion copy), two of them carbon.
P1BAR_CIF = make_cif([("C1", "C", 0.10, 0.20, 0.30), ("C2", "C", 0.30, 0.15, 0.10),
                      ("O1", "O", 0.25, 0.40, 0.20)], cell="4.1 4.6 5.2 80 85 95",
                     block="p1bar", symmetry=symmetry_ops(["x,y,z", "-x,-y,-z"]))


def _examples(structs):
    return [{"id": s.id, "lattice": s.lattice, "frac": s.frac, "numbers": s.numbers,
             "labels": s.labels, "site_index": s.site_index} for s in structs]


def _read(text, name="x"):
    found, skips = cif.read_cif_text(text, name)
    assert found and not skips
    return found


def test_dataset_table_has_the_sites_scoring_uses():
    found = _read(P1BAR_CIF)
    table = features.featurize_examples(_examples(found), 6)
    assert table.site is not None and len(np.unique(table.site)) == 3
    same_site = table.site[:, None] == table.site[None, :]
    np.testing.assert_array_equal(same_site, (found[0].site_index[:, None]
                                              == found[0].site_index[None, :]))
    scored = features.atom_table(found, 6)
    np.testing.assert_array_equal(same_site, scored.site[:, None] == scored.site[None, :])


def test_feature_cache_keeps_the_sites(tmp_path):
    table = features.featurize_examples(_examples(_read(P1BAR_CIF)), 4)
    table.save(str(tmp_path / "t.npz"))
    np.testing.assert_array_equal(features.AtomTable.load(str(tmp_path / "t.npz")).site,
                                  table.site)


def test_coincident_same_element_atoms_are_one_site():
    """Two listed positions of one disordered C 0.55 A apart (other CIF rows, beyond the
    reader's 0.4 A duplicate merge) are one site;
    an O as close stays its own."""
    text = make_cif([("C1", "C", 0.10, 0.10, 0.10), ("C1B", "C", 0.21, 0.10, 0.10),
                     ("O1", "O", 0.5, 0.5, 0.5), ("N1", "N", 0.61, 0.5, 0.5)],
                    cell="5 6 7 90 90 90", block="dis")
    found, _ = cif.read_cif_text(text, "dis", cif.ReadOptions(disorder="all"))
    table = features.featurize_examples(_examples(found), 3)
    site = table.site
    assert site[0] == site[1] and len({site[0], site[2], site[3]}) == 3


def _masked_logits(table, rows, params, model, spec, apply):
    """(R, C) logits of the atoms at rows, through the model's own input path; apply is
    the model's apply, jitted once per test (op-by-op dispatch of the graph models is
    several times slower than compiling them, and each test applies its model 3 times)."""
    if spec.reads == "graph":
        out = np.zeros((len(rows), model.num_classes), np.float32)
        for pack in graph_batch.inference_packs(table, rows, spec.receptive_hops, 4096,
                                                with_elements=True):
            logits = apply({"params": params}, graph_batch.stack([pack])[0])["logits"]
            keep = pack.loss_position >= 0
            out[pack.loss_position[keep]] = np.asarray(logits)[0][keep]
        return out
    inputs = input_pipeline.gather_inputs(table, rows, spec)
    return np.asarray(apply({"params": params}, inputs)["logits"])


@pytest.mark.parametrize("model_name,hops,element_states",
                         [("graph", 1, False), ("graph", 2, False), ("graph", 3, False),
                          ("graph", 2, True), ("tree", 2, False)])
def test_an_atoms_own_element_and_its_copies_never_reach_its_logits(model_name, hops,
                                                                     element_states):
    """Changing only atom 0's element and its site copies' leaves its logits bit-identical;
    changing another site's element changes them."""
    found = _read(P1BAR_CIF)
    table = features.featurize_examples(_examples(found), 5)
    config = config_lib.Config(model=model_name, k=5, hops=hops, width=16,
                               neighbour_elements=True, element_states=element_states)
    spec = config_lib.input_spec(config)
    model = models.create_model(config, 4)
    params = models.init_params(model, 5, jax.random.key(0),
                                input_pipeline.example_inputs(spec, 2))
    rows = np.arange(len(table))
    apply = jax.jit(model.apply)
    before = _masked_logits(table, rows, params, model, spec, apply)
    own = table.site == table.site[0]
    assert own.sum() == 2  # C1 and its inversion copy
    changed = dataclasses.replace(table, atomic_number=np.where(own, 7, table.atomic_number))
    after = _masked_logits(changed, rows, params, model, spec, apply)
    np.testing.assert_array_equal(after[own], before[own])
    other = table.site == table.site[np.flatnonzero(table.atomic_number == 8)[0]]
    neighbour_changed = dataclasses.replace(
        table, atomic_number=np.where(other, 16, table.atomic_number))
    moved = _masked_logits(neighbour_changed, rows, params, model, spec, apply)
    assert not np.array_equal(moved[own], before[own])
