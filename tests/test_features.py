"""The atom table (cryknn.features): built from structures and from dataset examples,
cached per (dataset build, k), joined, and written per atom as `cryknn featurize` does."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryknn import cif
from cryknn import errors
from cryknn import features
from tests import toy_data
from tests.conftest import METHANE_CIF, NACL_CIF

DATASET = "toy/synthetic"
QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    toy_data.write_toy_cache(d, DATASET, 8, (1, 6, 8, 7, 30))
    return d


@pytest.fixture(scope="module")
def crystals():
    return [cif.read_cif_text(NACL_CIF, "nacl")[0][0],
            cif.read_cif_text(METHANE_CIF, "methane")[0][0]]


def test_feature_cache_serves_smaller_k(data_dir):
    fingerprint = features.TOY_FINGERPRINT
    f = features.load_features(DATASET, "train", 3, fingerprint=fingerprint,
                               data_dir=data_dir, log=QUIET)
    full = features.AtomTable.load(
        features.cache_path(data_dir, DATASET, fingerprint, 8, "train"))
    assert f.k == 3
    np.testing.assert_array_equal(f.distances, full.distances[:, :3])
    np.testing.assert_array_equal(f.neighbour_index, full.neighbour_index[:, :3])
    assert features.find_cache(data_dir, DATASET, fingerprint, 9, "train") is None


def test_feature_cache_keeps_vectors_and_ignores_older_versions(tmp_path):
    ex = {"id": "cube:cube", "lattice": np.diag([2.0, 2.5, 3.0]), "frac": np.zeros((1, 3)),
          "numbers": np.array([29], np.int32), "labels": np.array(["Cu1"])}
    table = features.featurize_examples([ex], 4)
    path = features.cache_path(str(tmp_path), "x", "fp", 4, "train")
    table.save(path)
    loaded = features.AtomTable.load(path).first_k(3)
    assert loaded.neighbour_vector.shape == (1, 3, 3)
    np.testing.assert_array_equal(loaded.neighbour_vector, table.neighbour_vector[:, :3])
    # A cache of the layout before vectors (no version folder) is never found.
    old = os.path.join(str(tmp_path), "cryknn_features", "x", "fp", "k8", "train.npz")
    os.makedirs(os.path.dirname(old))
    table.save(old)
    assert features.find_cache(str(tmp_path), "x", "fp", 4, "train") == path
    assert features.find_cache(str(tmp_path), "x", "fp", 5, "train") is None


def test_featurize_examples_matches_brute_force():
    """Examples -> AtomTable through the featuriser (simple cubic: 6 at a, 12 at a*sqrt2)."""
    ex = {"id": "cube:cube", "lattice": np.eye(3) * 2.0, "frac": np.zeros((1, 3)),
          "numbers": np.array([29], np.int32), "labels": np.array(["Cu1"])}
    fs = features.featurize_examples([ex, dict(ex, id=b"cube2:cube2")], 7)
    assert len(fs) == 2 and list(fs.structure_id) == ["cube:cube", "cube2:cube2"]
    np.testing.assert_allclose(fs.distances[0], [2.0] * 6 + [2.0 * np.sqrt(2)], rtol=1e-5)
    assert fs.site_label[0] == b"Cu1"
    # One atom per cell: every neighbour is an image of the atom itself, in its own rows.
    assert fs.neighbour_index.tolist() == [[0] * 7, [1] * 7]
    # Its vectors: the six lattice vectors +-2 e_i, then one of the twelve at 2 * sqrt(2).
    assert fs.neighbour_vector.shape == (2, 7, 3) and fs.neighbour_vector.dtype == np.float32
    steps = np.round(fs.neighbour_vector / 2.0)
    np.testing.assert_allclose(fs.neighbour_vector, 2.0 * steps, atol=1e-5)
    np.testing.assert_array_equal(np.abs(steps).sum(axis=-1), [[1] * 6 + [2]] * 2)


def _same_site(site: np.ndarray) -> np.ndarray:
    """(A, A) bool: which atoms share a site (the partition, whatever its numbering)."""
    return site[:, None] == site[None, :]


def test_concatenated_tables_equal_the_table_of_all_structures(crystals):
    whole = features.atom_table(crystals, 4)
    parts = features.concatenate([features.atom_table([s], 4) for s in crystals])
    for name in ("distances", "neighbour_index", "atomic_number", "structure_index",
                 "site_label", "structure_id", "neighbour_vector"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), name)
    np.testing.assert_array_equal(_same_site(parts.site), _same_site(whole.site))
    assert features.concatenate([whole]) is whole


def test_per_atom_arrays_repeat_the_structure_id_and_round_trip(crystals, tmp_path):
    table = features.atom_table(crystals, 3)
    arrays = table.per_atom_arrays()
    nacl = crystals[0].num_atoms
    assert arrays["structure_id"].tolist() == (["nacl:nacl"] * nacl
                                               + ["methane:methane"] * crystals[1].num_atoms)
    assert arrays["site_label"].dtype.kind == "U" and arrays["structure_id"].dtype.kind == "U"
    assert arrays["site_label"].tolist() == [str(x) for s in crystals for x in s.labels]
    np.savez(tmp_path / "f.npz", **arrays)
    with np.load(tmp_path / "f.npz") as f:  # no pickle needed
        np.testing.assert_array_equal(f["neighbour_index"], table.neighbour_index)
        assert f["neighbour_vector"].shape == (len(table), 3, 3)
        assert set(f.files) == set(arrays)


def test_a_table_of_a_structure_that_cannot_be_featurised_names_it():
    flat = cif.Structure.from_arrays(np.diag([3.0, 3.0, 0.0]), np.zeros((1, 3)), [6],
                                     id="flat:flat")
    with pytest.raises(errors.FeaturizeError, match="degenerate lattice"):
        features.atom_table([flat], 3)


def test_connected_components_match_scipy():
    """Sites join through coincident atoms: the numpy components against scipy's, on
    random graphs with isolated nodes, self loops, repeated edges and long chains."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(5)
    chain = np.arange(199)
    for n, a, b in [(200, rng.integers(0, 200, 120), rng.integers(0, 200, 120)),
                    (200, chain[::-1], chain[::-1] + 1),  # one component, labels far apart
                    (7, np.array([3, 3, 5]), np.array([3, 6, 6])),
                    (4, np.zeros(0, np.int64), np.zeros(0, np.int64))]:
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        want = connected_components(graph, directed=False)[1]
        got = features.connected_components(n, a, b)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
