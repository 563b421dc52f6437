"""python -m cryknn.predict on tiny CIFs written here, with a model trained on toy features."""

import csv

import pytest

from cryknn import reading
from cryknn import scoring
from cryknn import site_scores
from tests.conftest import METHANE_CIF, error_lines, progress_free, run_module


@pytest.fixture()
def workdir(toy_workdir):
    return toy_workdir


@pytest.fixture()
def cifs(tmp_path):
    good = tmp_path / "methane.cif"
    good.write_text(METHANE_CIF)
    bad = tmp_path / "broken.cif"
    bad.write_text("this is not a CIF\n")
    return str(good), str(bad), str(tmp_path / "missing.cif")


def _predict(*args):
    return run_module("cryknn.predict", *args)


def test_scores_every_site_in_process(workdir, cifs, tmp_path):
    model = scoring.load_model(workdir)
    assert model.elements == ["H", "C", "O"] and model.k == 5
    structures, messages, all_read = reading.read_files([cifs[0]])
    assert all_read and not messages
    (score,) = model.score(structures)
    assert score.structure_id == "methane:methane"
    by_label = {s.site_label: s for s in score.sites}
    assert set(by_label) == {"C1", "H1", "H2", "H3", "H4", "O1", "Zn1"}
    assert by_label["Zn1"].p_given is None  # Zn is not a modelled element
    assert 0 <= by_label["C1"].p_given <= 1
    assert score.modelled_atoms == 6 and score.num_atoms == 7
    assert 0 < score.plausibility <= 1
    text = site_scores.format_structure(score, threshold=1.01)  # everything implausible
    assert text.count("IMPLAUSIBLE") == 6 and "not modelled" in text
    assert text.count("methane:methane") == 1  # named once, in the block's header


def test_cli_all_read_exit_0_and_csv(workdir, cifs, tmp_path):
    out = str(tmp_path / "sites.csv")
    r = _predict(f"--workdir={workdir}", f"--out={out}", cifs[0])
    assert r.returncode == 0, r.stderr
    assert "methane:methane" in r.stdout and "plausibility" in r.stdout
    with open(out) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == site_scores.CSV_COLUMNS
    assert len(rows) == 1 + 7 and all(row[0] == "methane:methane" for row in rows[1:])


def test_cli_unreadable_files_exit_1_one_line_each(workdir, cifs):
    good, bad, missing = cifs
    r = _predict(f"--workdir={workdir}", good, bad, missing)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = progress_free(r.stderr)  # the progress bar aside
    assert len(err) == 2
    assert any(line.startswith(bad) for line in err)
    assert any(line.startswith(missing) for line in err)
    assert "methane:methane" in r.stdout  # the readable file is still scored


def test_cli_without_model_exits_2_one_line(cifs, tmp_path):
    r = _predict(f"--workdir={tmp_path / 'nothing'}", cifs[0])
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no trained model" in r.stderr
