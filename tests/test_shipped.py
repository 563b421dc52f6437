"""The models shipped in cryknn/pretrained: they load in a fresh process, score a real
structure, and reproduce the test metrics stored with them on the embedded dataset."""

import json

import numpy as np
import pytest

from cryknn import cif
from cryknn import evaluate
from cryknn import features
from cryknn import input_pipeline
from cryknn import saved_model
from cryknn import scoring
from tests.conftest import run_module

SHIPPED = ("default", "masked")


@pytest.fixture(scope="module")
def real_cif(tmp_path_factory):
    """The first CoRE MOF 2019-ASR framework of the embedded archive, as a CIF file."""
    name, data = next(cif.iter_tar_cifs(cif.core_mof_archive("2019-ASR"), 1))
    path = tmp_path_factory.mktemp("cif") / name.rsplit("/", 1)[-1]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_ships_small_params_only_models(name):
    folder = scoring.PRETRAINED + "/" + name
    model = saved_model.load(folder)
    info = json.load(open(f"{folder}/{saved_model.MODEL_JSON}"))
    assert info["num_params"] == sum(int(np.prod(p.shape)) for p in _leaves(model.params))
    assert info["step"] == info["total_steps"]  # a finished run
    assert model.config.model == "tree" and model.k == 5 and len(model.symbols) == 20
    assert model.config.neighbour_elements == (name == "masked")
    assert info["dataset_fingerprint"] and info["test_metrics"]["balanced_accuracy"] > 0.5


def _leaves(tree):
    return [leaf for value in tree.values() for leaf in
            (_leaves(value) if isinstance(value, dict) else [value])]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_fresh_process_scores_a_real_structure(name, real_cif):
    r = run_module("cryknn.predict", f"--model_name={name}", str(real_cif))
    assert r.returncode == 0, r.stderr
    assert f"from shipped model '{name}'" in r.stdout and "plausibility" in r.stdout
    assert ("masked-atom" in r.stdout) == (name == "masked")


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_reproduce_their_stored_test_metrics(name, embedded_build):
    """Featurise the embedded dataset's test split (near-copy groups, sites from the CIFs)
    and score it: the metrics are the ones stored with the shipped model, on the dataset
    build it was trained on. The masked model hides each atom's site, as in training."""
    data_dir, record = embedded_build
    model = scoring.load_model(name=name)
    dataset = model.saved.config.dataset
    assert record["fingerprint"] == model.saved.info["dataset_fingerprint"]
    table = features.load_features(dataset, "test", model.k,
                                   fingerprint=record["fingerprint"],
                                   data_dir=data_dir, log=lambda m: None)
    labels = input_pipeline.label_table(model.saved.atomic_numbers)[table.atomic_number]
    rows = np.flatnonzero(labels >= 0)
    probs = model.predict_table(table, rows)
    cm, hits = evaluate.confusion_counts(labels[rows], probs, len(model.elements))
    got = evaluate.metrics_from_confusion(cm, hits, model.elements)
    stored = model.saved.info["test_metrics"]
    assert got["num_atoms"] == stored["num_atoms"]
    for key in ("accuracy", "balanced_accuracy", "top3_accuracy"):
        assert got[key] == pytest.approx(stored[key], abs=2e-3), key
