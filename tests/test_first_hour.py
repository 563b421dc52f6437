"""A new user's first hour (issue 22): the core install never tracebacks, typed tables,
nothing scored is a failure, one reader for the command and the API, guessed elements
reported, ase/pymatgen habits, long runs easy to follow, a suite that ships its helpers."""

import csv
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import cryknn
from cryknn import errors
from cryknn import reading
from cryknn import site_scores
from cryknn.cif import read_cif_text
from tests.conftest import (METHANE_CIF, NACL_CIF, REPO, error_lines, finish, make_cif,
                            progress_free, run_core_only, run_module, start_core_only,
                            start_module)


ORIGINAL_COLUMNS = ["structure_id", "site_label", "given_element", "predicted_element",
                    "p_predicted", "p_given", "multiplicity", "site_row", "atom_index",
                    "structure_warnings"]


def _one_line_naming(r, extra: str) -> None:
    lines = error_lines(r)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert f"pip install 'cryknn[{extra}]'" in lines[0], lines[0]


# 1. The core install never tracebacks: a missing extra is one line, before any work.

def test_train_without_its_extra_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_core_only("train", f"--data_dir={tmp_path / 'empty'}",
                      f"--workdir={tmp_path / 'w'}")
    _one_line_naming(r, "train")
    assert not (tmp_path / "w").exists()  # no work started


def test_data_stats_without_its_extra_is_one_line(tmp_path):
    _one_line_naming(run_core_only("data", "stats", f"--data_dir={tmp_path}"), "train")


def test_to_pandas_without_pandas_is_one_line(toy_workdir, monkeypatch):
    found, _ = read_cif_text(NACL_CIF, "nacl")
    scores = cryknn.load_model(toy_workdir).check(found)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(errors.MissingExtraError, match=r"pip install 'cryknn\[pandas\]'") as e:
        scores.to_pandas()
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_readme_core_commands_in_a_core_only_install(toy_workdir, tmp_path):
    """The README's commands where only the core dependencies can be imported: each exits 0
    or prints one line naming the extra it needs."""
    cif = tmp_path / "nacl.cif"
    cif.write_text(NACL_CIF)
    working = [["--version"], ["predict", str(cif)],
               ["check", f"--out={tmp_path / 's.csv'}", str(cif)],
               ["predict", f"--workdir={toy_workdir}", str(cif)],
               ["featurize", "--k=2", f"--out={tmp_path / 'x.npz'}", str(cif)],
               [f"python:import cryknn; m = cryknn.load_model(); "
                f"s = cryknn.read({str(cif)!r}); print(m.check(s)[0].plausibility)"]]
    needing = [(["train", "--k=5"], "train"), (["data", "build"], "train"),
               (["predict", str(REPO / "pyproject.toml")], "ase")]
    # Side by side: each child mostly waits on one core.
    children = [start_core_only(*args) for args in working + [a for a, _ in needing]]
    results = [finish(child) for child in children]
    assert results[0].returncode == 0 and cryknn.__version__ in results[0].stdout
    for args, r in zip(working[1:], results[1:]):
        assert r.returncode == 0 and not progress_free(r.stderr), (args, r.stderr)
    for (_, extra), r in zip(needing, results[len(working):]):
        _one_line_naming(r, extra)


# 2. Typed tables from the numbers.

def test_predict_and_featurize_of_nothing_exit_1(toy_workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    predict = start_module("cryknn.predict", f"--workdir={toy_workdir}",
                           f"--out={tmp_path / 'x.csv'}", str(tmp_path / "empty"))
    featurize = start_module("cryknn.featurize", "--k=2", f"--out={tmp_path / 'x.npz'}",
                             str(tmp_path / "empty"))  # side by side
    r = finish(predict)
    assert r.returncode == 1 and len(progress_free(r.stderr)) == 1, r.stderr
    assert not (tmp_path / "x.csv").exists()
    r = finish(featurize)
    assert r.returncode == 1 and len(progress_free(r.stderr)) == 1, r.stderr
    assert not (tmp_path / "x.npz").exists()


# 4. One reader for the command and the API.

def test_the_command_reads_what_cryknn_read_reads(toy_workdir, tmp_path):
    ase_io = pytest.importorskip("ase.io")
    found, _ = read_cif_text(METHANE_CIF, "methane")
    ase_io.write(tmp_path / "POSCAR", found[0].to_ase(), format="vasp")
    predict = start_module("cryknn.predict", f"--workdir={toy_workdir}",
                           str(tmp_path / "POSCAR"))
    featurize = start_module("cryknn.featurize", "--k=2", f"--out={tmp_path / 'x.npz'}",
                             str(tmp_path / "POSCAR"))  # side by side
    r = finish(predict)
    assert r.returncode == 0, r.stderr
    assert "POSCAR" in r.stdout and "plausibility" in r.stdout
    r = finish(featurize)
    assert r.returncode == 0, r.stderr
    assert len(np.load(tmp_path / "x.npz")["distances"]) == 7


def test_non_cif_without_ase_is_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ase", None)
    monkeypatch.setitem(sys.modules, "ase.io", None)
    (tmp_path / "POSCAR").write_text("whatever\n")
    found, messages, all_read = reading.read_files([str(tmp_path / "POSCAR")])
    assert not found and not all_read and len(messages) == 1
    assert "pip install 'cryknn[ase]'" in messages[0]


# 5. Elements guessed from labels are reported, and a label that is no element is a skip.

def test_labels_that_name_no_element_are_skipped_with_the_reason():
    cif = make_cif([("WatII", 0.1, 0.1, 0.1), ("C1", 0.5, 0.5, 0.5)],
                   site_columns=["label", "fract_x", "fract_y", "fract_z"], block="water")
    found, skips = read_cif_text(cif, "water")
    assert not found and len(skips) == 1
    assert "WatII" in skips[0].reason and "label" in skips[0].reason


@pytest.mark.parametrize("label,element", [("NaI", 11), ("NbII", 41), ("MgT", 12),
                                           ("OW1", 8), ("HN1", 1), ("Ca1", 20)])
def test_labels_that_start_with_an_element_symbol_are_read_as_it(label, element):
    """Mineral and water labels: an element symbol in its case, then a tag."""
    cif = make_cif([(label, 0.1, 0.1, 0.1), ("C1", 0.5, 0.5, 0.5)],
                   site_columns=["label", "fract_x", "fract_y", "fract_z"], block="tagged")
    found, skips = read_cif_text(cif, "tagged")
    assert not skips and found[0].numbers.tolist() == [element, 6]
    assert any(f"{label}->" in note for note in found[0].notes)


@pytest.mark.parametrize("label", ["Oa1", "Ow1", "Wat7"])
def test_a_one_letter_element_then_lowercase_is_no_element(label):
    cif = make_cif([(label, 0.1, 0.1, 0.1)], site_columns=["label", "fract_x", "fract_y",
                                                           "fract_z"], block="word")
    found, skips = read_cif_text(cif, "word")
    assert not found and label in skips[0].reason


def test_elements_guessed_from_labels_are_reported(toy_workdir):
    cif = make_cif([("C1", 0.1, 0.1, 0.1), ("O2", 0.5, 0.5, 0.5), ("Cu1", 0.3, 0.7, 0.2)],
                   site_columns=["label", "fract_x", "fract_y", "fract_z"], block="guess")
    (s,), skips = read_cif_text(cif, "guess")
    assert not skips and s.numbers.tolist() == [6, 8, 29]
    assert any("guessed from" in note and "Cu1->Cu" in note for note in s.notes)
    (score,) = cryknn.load_model(toy_workdir).check(s)
    assert any("guessed from" in w for w in score.warnings)


def test_featurize_reports_guessed_elements(tmp_path):
    cif = make_cif([("C1", 0.1, 0.1, 0.1), ("O2", 0.5, 0.5, 0.5)],
                   site_columns=["label", "fract_x", "fract_y", "fract_z"], block="guess")
    (tmp_path / "guess.cif").write_text(cif)
    r = run_module("cryknn.featurize", "--k=2", f"--out={tmp_path / 'x.npz'}",
                   str(tmp_path / "guess.cif"))
    assert r.returncode == 0, r.stderr
    assert "elements guessed from site labels" in r.stdout and "in 1 structure" in r.stdout


# 6. API habits of ase / pymatgen / scikit-learn.

def test_single_structures_and_foreign_objects_are_accepted(toy_workdir):
    ase = pytest.importorskip("ase")
    pymatgen = pytest.importorskip("pymatgen.core")
    (s,), _ = read_cif_text(METHANE_CIF, "methane")
    model = cryknn.load_model(toy_workdir)
    probs = model.predict_proba(s)
    assert probs.shape == (7, 3)
    np.testing.assert_allclose(model.predict_proba(s.to_ase()), probs, atol=1e-5)
    pmg = s.to_pymatgen()
    assert isinstance(pmg, pymatgen.Structure) and len(pmg) == 7
    np.testing.assert_allclose(model.predict_proba(pmg), probs, atol=1e-5)
    assert len(model.check(s)) == 1 and len(model.score([s.to_ase(), pmg])) == 2
    (nb,) = cryknn.knn(ase.Atoms("Na", cell=[3, 3, 3], pbc=True), k=2)
    np.testing.assert_allclose(nb.distances, 3.0, atol=1e-5)


def test_structure_repr_len_and_missing_paths(tmp_path):
    (s,), _ = read_cif_text(NACL_CIF, "nacl")
    assert len(s) == 8 and len(repr(s)) < 200 and "nacl:nacl" in repr(s)
    with pytest.raises(FileNotFoundError):
        cryknn.read(tmp_path / "missing.cif")
    (tmp_path / "broken.cif").write_text("not a CIF\n")
    assert len(cryknn.read(tmp_path / "broken.cif").skips) == 1  # content: still a skip


def test_help_fits_100_columns():
    r = run_module("cryknn.predict", "--help")
    assert r.returncode == 0 and "--flagged_out" in r.stdout
    assert all(len(line) <= 100 for line in r.stdout.splitlines()), r.stdout


def test_version_and_check_command(toy_workdir, tmp_path):
    r = run_module("cryknn.cli", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cryknn {cryknn.__version__}"
    (tmp_path / "nacl.cif").write_text(NACL_CIF)
    r = run_module("cryknn.cli", "check", f"--workdir={toy_workdir}", str(tmp_path / "nacl.cif"))
    assert r.returncode == 0 and "nacl:nacl" in r.stdout, r.stderr


# 7. Long runs: progress, a closing summary, plausibility per row, 100 columns, top 3,
# flagged sites for crystallographers' tools.

def test_long_run_output(toy_workdir, tmp_path):
    inputs = tmp_path / "in"  # outputs beside it: a CIF written into it would be an input
    inputs.mkdir()
    for i in range(3):
        (inputs / f"m{i}.cif").write_text(METHANE_CIF)
    (inputs / "broken.cif").write_text("not a CIF\n")
    out, flagged = tmp_path / "sites.csv", tmp_path / "flagged.cif"
    r = run_module("cryknn.predict", f"--workdir={toy_workdir}", f"--out={out}",
                   f"--flagged_out={flagged}", "--threshold=0.99", str(inputs))
    assert r.returncode == 1, r.stderr
    assert "file" in r.stderr.replace(progress_free(r.stderr)[0], "")  # the bar was there
    paths = (str(tmp_path), toy_workdir)  # the paths given are printed as they are
    assert all(len(line) <= 100 for line in r.stdout.splitlines()
               if not any(p in line for p in paths)), r.stdout
    assert r.stdout.count("m0:methane") == 2  # its block's header, and the summary
    summary = r.stdout[r.stdout.index("summary:"):]
    assert "4 files" in summary and "3 structures scored" in summary
    assert "1 file not read" in summary and "least plausible" in summary
    with open(out) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header == list(site_scores.CSV_COLUMNS)
    # added after the original columns; flag stays last
    assert header == ORIGINAL_COLUMNS + ["structure_plausibility", "top3", "p_vs_adjacent",
                                         "flag"]
    assert float(rows[0]["structure_plausibility"]) > 0
    assert len(rows[0]["top3"].split()) == 3
    back = cryknn.read(flagged)
    assert len(back) == 3 and back[0].num_atoms == 7
    text = flagged.read_text()
    assert "_atom_site_cryknn_flag" in text and "implausible" in text


def test_progress_bars_at_any_speed_are_not_noise():
    slow = "100%|##########| 1/1 [00:01<00:00,  1.66s/file]\n"
    fast = "  0%|          | 0/1 [00:00<?, ?file/s]\r100%|#| 1/1 [00:00<00:00, 9.1file/s]\n"
    assert progress_free(slow + fast) == []
    assert progress_free("WARNING: something\n") == ["WARNING: something"]


@pytest.mark.slow
def test_sdist_carries_test_helpers_and_licence(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with tarfile.open(tmp_path / r.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO")))
        metadata = info.read().decode()
    assert {"tests/conftest.py", "tests/oracle.py", "tests/__init__.py", "tests/toy_data.py",
            "LICENSE"} <= names
    assert "MIT" in metadata and "CC-BY-4.0" in (REPO / "LICENSE").read_text()
    assert os.path.exists(REPO / "LICENSE")
