"""The graph models train, score and have a masked-atom mode; the tree model's inputs
(each atom's neighbourhood unrolled on the host) follow the periodic k-NN graph.

The on-device graph model's batches and invariances: tests/test_graph_batch.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryknn import cif
from cryknn import config as config_lib
from cryknn import errors
from cryknn import features
from cryknn import input_pipeline
from cryknn import message_passing
from cryknn import models
from cryknn import scoring
from cryknn import train
from tests.conftest import NACL_CIF
from tests import toy_data

QUIET = lambda message: None  # noqa: E731


def test_gather_inputs_follows_the_knn_graph():
    table = toy_data.toy_features((1, 6, 8, 30), 25, 4, seed=3)
    rows = np.array([0, 7, 42, 99])
    spec = config_lib.InputSpec(k=3, hops=2, neighbour_elements=True)
    inputs = input_pipeline.gather_inputs(table, rows, spec)
    assert inputs["distances"].shape == (4, 3)
    assert inputs["neighbour_distances_1"].shape == (4, 3, 3)
    assert inputs["neighbour_distances_2"].shape == (4, 9, 3)
    nbr = table.neighbour_index
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(inputs["distances"][b], table.distances[row, :3])
        for n in range(3):
            child = nbr[row, n]
            np.testing.assert_array_equal(inputs["neighbour_distances_1"][b, n],
                                          table.distances[child, :3])
            assert inputs["neighbour_elements_1"][b, n] == table.atomic_number[child]
            for j in range(3):  # node n's children sit at n * k + j of the next hop
                np.testing.assert_array_equal(inputs["neighbour_distances_2"][b, 3 * n + j],
                                              table.distances[nbr[child, j], :3])
    geometry = input_pipeline.gather_inputs(table, rows, config_lib.InputSpec(k=3, hops=2))
    assert sorted(geometry) == ["distances", "neighbour_distances_1", "neighbour_distances_2"]


def test_masked_mode_never_shows_an_atom_its_own_element():
    """A neighbour's neighbour is often the atom itself (and in small cells a neighbour is
    its own periodic image): those nodes get element 0, unknown."""
    table = toy_data.toy_features((1, 6, 8, 30), 4, 3, atoms_per_structure=4, seed=1)
    rows = np.arange(len(table))
    spec = config_lib.InputSpec(k=3, hops=2, neighbour_elements=True)
    inputs = input_pipeline.gather_inputs(table, rows, spec)
    nbr = table.neighbour_index[:, :3]
    hop2 = nbr[nbr].reshape(len(rows), 9)
    assert np.any(hop2 == rows[:, None])  # the atom does come back at hop 2
    for hop, index in ((1, nbr), (2, hop2)):
        elements = inputs[f"neighbour_elements_{hop}"]
        assert np.all(elements[index == rows[:, None]] == 0)
        others = index != rows[:, None]
        np.testing.assert_array_equal(elements[others], table.atomic_number[index][others])


def test_tree_interaction_is_invariant_to_the_order_of_children():
    layer = message_passing.Interaction(width=16)
    rng = np.random.default_rng(0)
    parent = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
    children = jnp.asarray(rng.normal(size=(2, 3 * 4, 16)), jnp.float32)
    edges = jnp.asarray(rng.uniform(0.8, 4.0, (2, 3, 4)), jnp.float32)
    params = layer.init(jax.random.key(0), parent, children, edges, train=False)
    out = layer.apply(params, parent, children, edges, train=False)
    perm = rng.permutation(4)
    shuffled = children.reshape(2, 3, 4, 16)[:, :, perm].reshape(2, 12, 16)
    again = layer.apply(params, parent, shuffled, edges[:, :, perm], train=False)
    np.testing.assert_allclose(out, again, rtol=1e-5, atol=1e-5)
    moved = layer.apply(params, parent, children, edges + 0.5, train=False)
    assert not np.allclose(out, moved)  # the edge distances matter


@pytest.mark.parametrize("hops,masked", [(1, False), (2, False), (2, True)])
def test_tree_model_shapes_and_inputs(hops, masked):
    config = config_lib.Config(model="tree", k=4, hops=hops, width=16,
                               neighbour_elements=masked)
    model = models.create_model(config, 5)
    inputs = input_pipeline.filler_inputs(config_lib.input_spec(config), 3)
    params = models.init_params(model, 4, jax.random.key(0), inputs)
    assert ("element_embedding" in params) == masked
    assert sorted(k for k in params if k.startswith("round")) == [f"round{r}" for r in range(hops)]
    out = model.apply({"params": params}, inputs)
    assert out["logits"].shape == (3, 5)


def test_neighbour_elements_needs_the_graph_model():
    with pytest.raises(errors.ConfigError, match="neighbour_elements"):
        models.create_model(config_lib.Config(model="mlp", neighbour_elements=True), 3)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    toy_data.write_toy_cache(data_dir, "toy/graph", 5, (11, 17, 8))
    return data_dir


@pytest.mark.parametrize("model_name,masked", [("graph", False), ("graph", True),
                                               ("tree", False)])
def test_graph_models_train_and_score_a_structure(toy_dir, tmp_path, model_name, masked):
    config = config_lib.Config(dataset="toy/graph", data_dir=toy_dir, k=5, model=model_name,
                               hops=2, width=16, num_elements=3, epochs=2, batch_size=64,
                               log_every=1000, monitor_per_element=40, neighbour_elements=masked)
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert metrics["test"]["accuracy"] > 0.5 and np.isfinite(metrics["test"]["loss"])
    model = scoring.load_model(str(tmp_path))
    assert model.spec.hops == 2 and model.spec.neighbour_elements == masked
    assert ("masked-atom" in model.describe()) == masked
    found, _ = cif.read_cif_text(NACL_CIF, "nacl")
    (score,) = model.score(found)
    assert {s.site_label for s in score.sites} == {"Na1", "Cl1"}
    assert sum(s.multiplicity for s in score.sites) == 8 and 0 < score.plausibility <= 1


def test_each_model_has_its_own_defaults():
    assert models.hyperparameters(config_lib.Config(model="graph"))["width"] == 64
    assert models.hyperparameters(config_lib.Config(model="mlp"))["width"] == 128
    assert models.hyperparameters(config_lib.Config(model="graph", width=32))["width"] == 32
    assert config_lib.Config(model="graph").batch_size == 4096
    assert config_lib.Config(model="mlp").batch_size == 512
    assert config_lib.Config(model="mlp", batch_size=64).batch_size == 64


def test_a_graph_run_from_before_directions_is_the_tree_model():
    """config.json of cryknn < 0.3 said 'graph' for what is now the tree model."""
    old = config_lib.from_dict({"model": "graph", "k": 5, "hops": 2})
    assert old.model == "tree"
    assert config_lib.from_dict({"model": "graph", "directions": False}).model == "graph"


def test_masked_mode_hides_the_symmetry_copies_of_a_site():
    """From a CIF, the symmetry copies of a site are that site: none shows its element."""
    found, _ = cif.read_cif_text(NACL_CIF, "nacl")
    table = features.atom_table(found, 6)
    assert len(np.unique(table.site)) == 2  # Na1 and Cl1, four atoms each
    spec = config_lib.InputSpec(k=6, hops=2, neighbour_elements=True)
    inputs = input_pipeline.gather_inputs(table, np.arange(8), spec)  # the tree model's
    # Every first neighbour is of the other site and shows its element; at hop 2 the
    # atom's own site comes back and is hidden.
    assert np.all(inputs["neighbour_elements_1"] == np.where(table.atomic_number == 11, 17,
                                                             11)[:, None])
    hop2 = inputs["neighbour_elements_2"]
    assert np.all((hop2 == 0) | (hop2 != table.atomic_number[:, None]))
    assert np.all(hop2 == 0)  # in rock salt the second shell is the atom's own site
