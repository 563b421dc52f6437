"""The models shipped in cryknn/pretrained: they load in a fresh process, score a real
structure, and reproduce the test metrics stored with them on the embedded dataset."""

import json
import re
import sys

import numpy as np
import pytest

from cryknn import cif
from cryknn import member_forward
from cryknn import saved_model
from cryknn import scoring
from tests import side_lane
from tests.conftest import REPO, run_module, subprocess_env

SHIPPED = ("default", "masked")
# Both retrained with the graph model (whole structures on the device, directions read).
DESIGN = {"default": "graph", "masked": "graph"}
ENSEMBLE = "masked_ensemble"  # three masked tree and three masked graph seeds: the checking default


def test_package_data_carries_every_shipped_file():
    """The wheel holds what pyproject's package-data globs match (as setuptools globs,
    '*' within one folder): every file of every shipped model, ensemble members included."""
    import glob
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["cryknn"]
    root = REPO / "cryknn"
    matched = {p for pattern in patterns for p in glob.glob(str(root / pattern))}
    shipped = {str(p) for p in (root / "pretrained").rglob("*") if p.is_file()}
    assert shipped and not shipped - matched, sorted(shipped - matched)


def test_the_shipped_ensemble_is_six_masked_seeds_and_checks_by_default():
    # Chosen on validation, out of fold, over three trees, six graphs and all nine
    # (docs/results.md A0.10).
    model = scoring.load_model(name=ENSEMBLE)
    single = scoring.load_model(name="masked")
    kinds = [member.config.model for member in model.saved.members]
    assert model.num_members == 6 and kinds == ["tree"] * 3 + ["graph"] * 3
    assert model.spec.neighbour_elements and single.spec.neighbour_elements
    assert model.spec.k == single.spec.k and model.elements == single.elements
    assert model.saved.info["member_seeds"] == [0, 1, 2, 0, 1, 2]
    assert model.saved.info["checking"]["chosen_on"] == "validation"
    assert scoring.checking_default() == ENSEMBLE


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
    assert model.config.model == DESIGN[name] and model.k == 5 and len(model.symbols) == 20
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


# A child on the side lane (tests/side_lane.py) builds the embedded CoRE MOF dataset the
# shipped models were trained on (about two minutes: reading 12,000 CIFs, near-copy
# fingerprints, TFRecords) and measures both models on its test split, beside the other
# tests.
_MEASURE = """
if __name__ == "__main__":
    import json, sys
    import numpy as np
    from cryknn import evaluate, features, input_pipeline, scoring
    data_dir, out = sys.argv[1], {}
    for name in sys.argv[2:]:
        model = scoring.load_model(name=name)
        dataset = model.saved.config.dataset
        record = features.dataset_record(dataset, data_dir, build_if_missing=True)
        table = features.load_features(dataset, "test", model.k,
                                       fingerprint=record["fingerprint"], data_dir=data_dir)
        labels = input_pipeline.label_table(model.saved.atomic_numbers)[table.atomic_number]
        rows = np.flatnonzero(labels >= 0)
        probs = model.predict_table(table, rows)
        cm, hits = evaluate.confusion_counts(labels[rows], probs, len(model.elements))
        out[name] = {"fingerprint": record["fingerprint"],
                     "metrics": evaluate.metrics_from_confusion(cm, hits, model.elements)}
    with open(f"{data_dir}/measured.json", "w") as f:
        json.dump(out, f)
"""


def _measure_job(folder):
    # XLA's default optimisation, not the suite's -O0: this child runs two models over
    # 375,000 atoms and compiles little (-O0 cost it 90 s of CPU against 70).
    env = subprocess_env()
    env["XLA_FLAGS"] = re.sub(r"--xla_backend_optimization_level=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    return side_lane.Job([sys.executable, "-c", _MEASURE, str(folder), *SHIPPED],
                         env, REPO, timeout=1200)


@pytest.mark.slow
@pytest.mark.side_lane(job=_measure_job, name="shipped_metrics")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_reproduce_their_stored_test_metrics(name, side_job):
    """Featurise the embedded dataset's test split (near-copy groups, sites from the CIFs)
    and score it: the metrics are the ones stored with the shipped model, on the dataset
    build it was trained on. The masked model hides each atom's site, as in training."""
    result = side_job.result
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    measured = json.loads((side_job.folder / "measured.json").read_text())[name]
    model = scoring.load_model(name=name)
    assert measured["fingerprint"] == model.saved.info["dataset_fingerprint"]
    got, stored = measured["metrics"], model.saved.info["test_metrics"]
    assert got["num_atoms"] == stored["num_atoms"]
    for key in ("accuracy", "balanced_accuracy", "top3_accuracy"):
        assert got[key] == pytest.approx(stored[key], abs=2e-3), key


def test_ensemble_members_share_one_trace_and_keep_their_own_inputs(real_cif):
    """Members trained alike differ in parameters and input statistics only: one jitted
    forward pass per architecture serves them all (one trace each at start-up), and each
    member still predicts what it predicts alone."""
    import jax

    from cryknn import features

    model = scoring.load_model(name=ENSEMBLE)
    architectures = {(m.config.model, m.config.width) for m in model.saved.members}
    assert len({id(member.probs_fn) for member in model._forward}) == len(architectures)
    assert len({jax.tree_util.tree_leaves(member.weights[0])[0].tobytes()
                for member in model._forward}) == model.num_members
    table = features.atom_table(cif.read_cif(str(real_cif))[0], model.k)
    rows, classes = np.arange(len(table)), len(model.elements)
    for saved, member in zip(model.saved.members, model._forward):
        alone = scoring.Model(saved, saved.folder)
        np.testing.assert_array_equal(
            member_forward.predict(member, table, rows, classes),
            member_forward.predict(alone._forward[0], table, rows, classes))


def test_shipped_models_name_no_folder_of_the_training_machine():
    for path in (REPO / "cryknn" / "pretrained").rglob(saved_model.MODEL_JSON):
        config = json.loads(path.read_text())["run"]["config"]
        assert config["data_dir"] is None and config["manual_dir"] is None, path
