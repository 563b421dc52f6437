"""Broken models are never passed as plausible, damaged or foreign workdirs are refused or
worked around with a note, two runs never share a workdir, absurd input is flagged."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from cryknn import checkpoints
from cryknn import cif
from cryknn import config as config_lib
from cryknn import errors
from cryknn import features
from cryknn import input_pipeline
from cryknn import saved_model
from cryknn import scoring
from cryknn import util
from tests.conftest import METHANE_CIF, error_lines, make_cif, run_module, run_python


@pytest.fixture()
def workdir(toy_workdir, tmp_path):
    """A copy of the toy workdir that a test may damage."""
    return shutil.copytree(toy_workdir, tmp_path / "w")


@pytest.fixture()
def methane(tmp_path):
    path = tmp_path / "methane.cif"
    path.write_text(METHANE_CIF)
    return str(path)


def _predict(*args):
    return run_module("cryknn.predict", *args)


def test_a_model_with_non_finite_parameters_is_refused(workdir, methane):
    export = os.path.join(workdir, "model")
    model = saved_model.load(export)
    params = {**model.params, "head": {**model.params["head"]}}
    params["head"]["bias"] = np.full_like(params["head"]["bias"], np.nan)
    with pytest.raises(errors.ModelError, match="non-finite"):
        saved_model.save(export, model.run, params)
    from flax import serialization

    with open(os.path.join(export, "params.msgpack"), "wb") as f:  # as a bit flip would
        f.write(serialization.msgpack_serialize(params))
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    r = _predict(f"--workdir={workdir}", methane)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and "non-finite" in lines[0] and "params.msgpack" in lines[0]


def test_a_finished_workdir_loads_its_export_without_orbax(toy_workdir):
    """orbax (0.1 s to import) is for runs without a usable export only."""
    r = run_python("import sys; from cryknn import scoring; "
                   f"m = scoring.load_model({str(toy_workdir)!r}); "
                   "print(m.source, 'orbax.checkpoint' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False" and "workdir" in r.stdout


def test_a_damaged_export_falls_back_on_the_checkpoints_and_says_so(workdir, methane):
    path = os.path.join(workdir, "model", "params.msgpack")
    with open(path, "r+b") as f:
        f.truncate(100)
    r = _predict(f"--workdir={workdir}", methane)
    assert r.returncode == 0, r.stderr
    assert "note:" in r.stdout and "params.msgpack" in r.stdout and "checkpoints" in r.stdout
    assert "plausibility" in r.stdout


def test_a_damaged_newest_checkpoint_falls_back_on_an_older_one(workdir):
    shutil.rmtree(os.path.join(workdir, "model"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    newest = os.path.join(workdir, "checkpoints", str(steps[-1]))
    if len(steps) == 1:  # keep an intact copy as an older step
        shutil.copytree(newest, os.path.join(workdir, "checkpoints", str(steps[-1] - 1)))
    for root, _, files in os.walk(os.path.join(newest, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    model = checkpoints.load_trained(workdir)
    assert model.step < steps[-1] or len(steps) == 1
    assert any("damaged" in note for note in model.info["notes"])


def test_a_corrupt_run_definition_is_one_line_naming_the_file(workdir, methane):
    shutil.rmtree(os.path.join(workdir, "model"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write("{not json")
    r = _predict(f"--workdir={workdir}", methane)
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1 and "config.json" in lines[0]


def test_checkpoints_without_a_run_definition_are_not_resumed(workdir):
    os.remove(os.path.join(workdir, "config.json"))
    run = json.load(open(os.path.join(workdir, "model", "model.json")))["run"]
    with pytest.raises(errors.ConfigError, match="no config.json"):
        checkpoints.check_same_run(workdir, run)


def test_json_outputs_are_always_valid_json(tmp_path):
    path = tmp_path / "m.json"
    util.write_json(path, {"loss": float("nan"), "history": [{"x": float("inf")}, 1.5]})
    assert json.loads(path.read_text()) == {"loss": None, "history": [{"x": None}, 1.5]}


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result is readable by
    others as a plain open() would make it (0666 less the umask)."""
    path = tmp_path / "m.json"
    util.write_json(path, {})
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_non_ascii_site_labels_are_kept():
    """Labels are text; one outside ASCII (e.g. U+FFFD from a damaged record) is kept."""
    s = cif.Structure.from_arrays(np.eye(3) * 5, [[0, 0, 0], [0.5, 0.5, 0.5]], [6, 8])
    s = dataclasses.replace(s, labels=np.asarray(["C1\u00b4", "O\ufffd"]))
    table = features.atom_table([s], k=3)
    assert [label.decode("utf-8") for label in table.site_label] == ["C1\u00b4", "O\ufffd"]


@pytest.mark.parametrize("args,expect", [(["--batch_size=0"], "batch_size"),
                                         (["--threshold=1.5"], "--threshold"),
                                         (["--threshold=0"], "--threshold")])
def test_predict_flag_values_are_checked(workdir, methane, args, expect):
    r = _predict(f"--workdir={workdir}", *args, methane)
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]


@pytest.mark.parametrize("cell,sites,warning", [
    ("0.000001 0.000001 0.000001 90 90 90", [("C1", "C", 0, 0, 0)], "closer than"),
    ("1000000 1000000 1000000 90 90 90", [("C1", "C", 0, 0, 0)], "no neighbour within"),
    ("5 5 5 90 90 90", [("C1", "C", 0.1, 0.1, 0.1), ("O1", "O", 0.1, 0.1, 0.1)],
     "closer than"),
])
def test_absurd_geometry_is_scored_with_a_warning(toy_workdir, cell, sites, warning):
    found, skips = cif.read_cif_text(make_cif(sites, cell=cell), "absurd",
                                     cif.ReadOptions(merge_duplicates=False))
    assert found, skips
    (score,) = scoring.load_model(toy_workdir).score(found)
    assert any(warning in w for w in score.warnings), score.warnings


def test_occupancy_above_one_is_a_warning(toy_workdir):
    text = make_cif([("C1", "C", 0.1, 0.2, 0.3, 5), ("O1", "O", 0.5, 0.5, 0.5, 1)],
                    cell="4 4 4 90 90 90",
                    site_columns=["label", "type_symbol", "fract_x", "fract_y", "fract_z",
                                  "occupancy"])
    found, _ = cif.read_cif_text(text, "occ", cif.ReadOptions(disorder="all"))
    (score,) = scoring.load_model(toy_workdir).score(found)
    assert any("occupancy above 1" in w for w in score.warnings), score.warnings


def test_a_rebuilt_dataset_is_never_served_stale_features(tmp_path):
    """The feature cache is keyed by the dataset build: a rebuild from more files is new."""
    from cryknn import datasets
    from tests.test_datasets import write_cif_folder

    root = tmp_path / "cifs"
    root.mkdir()
    write_cif_folder(str(root))
    data_dir = str(tmp_path / "tfds")
    config = config_lib.Config(dataset="crystal_structures/cif_dir", data_dir=data_dir, k=2,
                               num_elements=2)
    datasets.build(config.dataset, data_dir, manual_dir=str(root), num_workers=0,
                   log=lambda m: None)
    first = features.dataset_record(config.dataset, data_dir, build_if_missing=False)
    before = input_pipeline.prepare(config, log=lambda m: None)
    (root / "ZZZZZZ_extra.cif").write_text(NACL_LIKE)
    datasets.build(config.dataset, data_dir, manual_dir=str(root), num_workers=0,
                   overwrite=True, log=lambda m: None)
    second = features.dataset_record(config.dataset, data_dir, build_if_missing=False)
    assert second["fingerprint"] != first["fingerprint"]
    after = input_pipeline.prepare(config, log=lambda m: None)
    atoms = sum(len(getattr(after, s).table) for s in ("train", "validation", "test"))
    assert atoms == sum(len(getattr(before, s).table) for s in ("train", "validation",
                                                                "test")) + 8


NACL_LIKE = make_cif([("Na1", "Na", 0, 0, 0), ("Cl1", "Cl", 0.5, 0.5, 0.5)],
                     cell="5.64 5.64 5.64 90 90 90", block="ZZZZZZ",
                     symmetry="_space_group_name_H-M_alt 'F m -3 m'")


def test_training_logs_and_records_its_dataset(toy_workdir):
    lines = open(os.path.join(toy_workdir, "metrics.jsonl")).read().splitlines()
    entry = json.loads(lines[-1])
    for key in ("epoch", "train_loss", "validation_balanced_accuracy", "learning_rate",
                "atoms_per_s"):
        assert key in entry
    assert os.listdir(os.path.join(toy_workdir, "tensorboard"))
    for name in ("config.json", "metrics.json"):
        saved = json.load(open(os.path.join(toy_workdir, name)))
        assert saved["dataset_fingerprint"] == features.TOY_FINGERPRINT


def test_a_partial_build_is_announced(tmp_path):
    from cryknn import datasets

    data_dir = str(tmp_path)
    datasets.build("crystal_structures/core_mof_2014", data_dir, limit=30, num_workers=0,
                   log=lambda m: None)
    config = config_lib.Config(dataset="crystal_structures/core_mof_2014", data_dir=data_dir,
                               k=2, num_elements=2, epochs=1, batch_size=32)
    messages = []

    def log(message):  # announced before any featurising: stop there
        messages.append(message)
        if "partial build" in message:
            raise _Announced

    with pytest.raises(_Announced):
        input_pipeline.prepare(config, log=log)
    assert any("partial build" in m and "30" in m for m in messages), messages


class _Announced(Exception):
    """Raised by a log callback: what it waited for was logged."""


def test_atoms_removed_while_reading_are_noted_in_the_scores(toy_workdir):
    text = make_cif([("C1", "C", 0.10, 0.1, 0.1), ("C2", "C", 0.13, 0.1, 0.1),
                     ("O1", "O", 0.5, 0.5, 0.5)], cell="10 10 10 90 90 90", block="dup")
    found, _ = cif.read_cif_text(text, "dup")
    (score,) = scoring.load_model(toy_workdir).score(found)
    assert any("removed 1 atoms: duplicate atoms merged" in w for w in score.warnings)
