"""Hostile input and output paths (issue 21): nothing but an output is ever overwritten,
every file costs bounded time and memory, one bad structure never stops a batch, model
files are checked against each other, and no input is silently misread."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from cryknn import elements
from cryknn import errors
from cryknn import knn_plan
from cryknn import neighbours
from cryknn import cif
from cryknn import util
from tests import oracle
from tests.conftest import (METHANE_CIF, NACL_CIF, error_lines, finish, make_cif, run_module,
                            start_module)

P1 = "_symmetry_space_group_name_H-M 'P 1'"


@pytest.fixture()
def methane(tmp_path):
    path = tmp_path / "methane.cif"
    path.write_text(METHANE_CIF)
    return str(path)


def _one_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------
# Outputs: only regular files that are not inputs.


def test_out_that_is_an_input_is_refused(methane):
    before = open(methane).read()
    _one_error(run_module("cryknn.predict", f"--out={methane}", methane), "input")
    assert open(methane).read() == before


def test_out_that_is_a_device_or_fifo_is_refused(tmp_path, methane):
    fifo = tmp_path / "n.csv"
    os.mkfifo(fifo)
    _one_error(run_module("cryknn.predict", f"--out={fifo}", methane), "regular file")
    assert not fifo.is_file() and fifo.exists()
    npz = tmp_path / "n.npz"
    os.mkfifo(npz)
    _one_error(run_module("cryknn.featurize", f"--out={npz}", methane), "regular file")
    with pytest.raises(util.UnsafeOutputError, match="regular file"):
        with util.atomic_open("/dev/null") as f:
            f.write("x")


def test_out_that_is_a_symlink_is_refused(tmp_path, methane):
    target = tmp_path / "target.csv"
    target.write_text("keep")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    _one_error(run_module("cryknn.predict", f"--out={link}", methane), "symbolic link")
    assert link.is_symlink() and target.read_text() == "keep"


def test_stale_temporary_files_are_named_and_cleaned(tmp_path):
    out = tmp_path / "x.csv"
    dead = tmp_path / f".x.csv.cryknn-partial-{2 ** 22 + 7}.abc.tmp"  # no such process
    dead.write_text("half")
    mine = tmp_path / f".x.csv.cryknn-partial-{os.getpid()}.abc.tmp"  # a live writer
    mine.write_text("busy")
    with util.atomic_open(out) as f:
        f.write("done")
        names = os.listdir(tmp_path)
        assert any("cryknn-partial" in n and str(os.getpid()) in n for n in names)
    assert out.read_text() == "done"
    assert not dead.exists() and mine.exists()


# ----------------------------------------------------------------------------
# Per-file budgets.


def test_a_fifo_named_cif_is_skipped_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.cif"
    os.mkfifo(fifo)
    found, skips = cif.read_cif(fifo)
    assert not found and "not a regular file" in skips[0].reason
    (skip,) = [s for s in cif.iter_structures([tmp_path])]
    assert "not a regular file" in skip.reason


def test_a_link_to_dev_zero_is_skipped(tmp_path):
    link = tmp_path / "zero.cif"
    link.symlink_to("/dev/zero")
    found, skips = cif.read_cif(link)
    assert not found and "not a regular file" in skips[0].reason


def test_files_over_the_size_cap_are_skipped(tmp_path):
    path = tmp_path / "big.cif"
    path.write_text(NACL_CIF + "#" * 2000 + "\n")
    found, skips = cif.read_cif(path, max_bytes=1000)
    assert not found and "larger than" in skips[0].reason
    assert cif.read_cif(path)[0]


def test_coincident_atoms_are_a_reasoned_skip():
    rows = [(f"C{i}", "C", 0.25, 0.25, 0.25) for i in range(30000)]
    found, skips = cif.read_cif_text(make_cif(rows, cell="10 10 10 90 90 90",
                                              symmetry=P1), "pile")
    assert not found and "coincident" in skips[0].reason, skips
    rows = [(f"C{i}", "C", 0.1, 0.2, 0.3) for i in range(2000)]
    found, skips = cif.read_cif_text(make_cif(
        rows, cell="10 10 10 90 90 90", symmetry="_space_group_name_H-M_alt 'F m -3 m'"),
        "pile")
    assert not found and "coincident" in skips[0].reason, skips


@pytest.mark.parametrize("cell,why", [("1e-25 1e-25 1e-25 90 90 90", "outside"),
                                      ("1e20 1e20 1e20 90 90 90", "outside"),
                                      ("1e19 5 5 90 90 90", "outside")])
def test_cells_beyond_float32_are_skipped(cell, why):
    found, skips = cif.read_cif_text(make_cif([("C1", "C", 0, 0, 0)], cell=cell), "c")
    assert not found and why in skips[0].reason and "float32" in skips[0].reason


def test_too_many_lattice_images_is_a_reasoned_skip():
    s = cif.Structure.from_arrays(np.diag([1e-6, 1e6, 1e6]), [[0, 0, 0]], [6])
    good, skips = neighbours.split_featurizable([s], k=5)
    assert not good and "lattice images" in skips[0].reason and "k = 5" in skips[0].reason
    with pytest.raises(errors.FeaturizeError, match="lattice images"):
        neighbours.featurize([s], 5)


def test_k_is_bounded_and_an_integer():
    s = cif.Structure.from_arrays(np.eye(3) * 5, [[0, 0, 0]], [6])
    with pytest.raises(errors.FeaturizeError, match="k must be"):
        neighbours.featurize([s], 2.5)
    with pytest.raises(errors.FeaturizeError, match="at most"):
        neighbours.featurize([s], 100_000)
    import cryknn

    with pytest.raises(errors.FeaturizeError):
        cryknn.knn([s], k=2.5)


# ----------------------------------------------------------------------------
# Element symbols and coordinates.


@pytest.mark.parametrize("symbol", ["Uuo", "Uuo1", "Uub", "Ubn"])
def test_placeholder_element_names_are_not_read_as_uranium(symbol):
    with pytest.raises(errors.UnknownElementError):
        elements.element_from_type_symbol(symbol)
    found, skips = cif.read_cif_text(make_cif([("X1", symbol, 0, 0, 0)]), "uuo")
    assert not found and symbol in skips[0].reason


def test_real_symbols_and_isotopes_still_read():
    for symbol, z in [("U", 92), ("U4+", 92), ("Og", 118), ("D", 1), ("T1", 1), ("Ow1", 8),
                      ("Cl1A", 17)]:
        assert elements.element_from_type_symbol(symbol) == z


@pytest.mark.parametrize("x", ["1e300", "-1e12", "1e7"])
def test_absurd_fractional_coordinates_are_skipped(x):
    found, skips = cif.read_cif_text(
        make_cif([("C1", "C", x, 0, 0), ("O1", "O", 0.5, 0.5, 0.5)]), "far")
    assert not found and "fractional coordinate" in skips[0].reason
    with pytest.raises(errors.DataFormatError, match="fractional"):
        cif.Structure.from_arrays(np.eye(3) * 5, [[float(x), 0, 0]], [6])


# ----------------------------------------------------------------------------
# Unclear errors.


def test_a_utf8_bom_is_read():
    found, skips = cif.read_cif_text(b"\xef\xbb\xbf" + NACL_CIF.encode(), "bom")
    assert found and not skips


def test_a_non_ascii_unquoted_value_is_read_or_named():
    text = make_cif([("C\u00e91", "C", 0, 0, 0), ("\u00e9", "O", 0.5, 0.5, 0.5)])
    found, skips = cif.read_cif_text(text.encode("utf-8"), "accent")
    assert list(found[0].labels) == ["C\u00e91", "\u00e9"], skips
    text = make_cif([("C1", "C", 0, 0, 0)]).replace("_cell_length_a", "_cell_length_a\u00e9")
    found, skips = cif.read_cif_text(text.encode("utf-8"), "accent")
    assert not found and "U+00E9" in skips[0].reason and "line 2" in skips[0].reason


def test_featurize_with_nothing_read_exits_1_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 5\n")
    out = tmp_path / "f.npz"
    r = run_module("cryknn.featurize", "--k=2", f"--out={out}", bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert not out.exists()
    assert "Traceback" not in r.stderr
    assert "nothing" in r.stderr


# ----------------------------------------------------------------------------
# Isolation: one bad structure among good ones.


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_one_unfeaturisable_structure_does_not_stop_predict(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder, "a_good.cif", NACL_CIF)
    _write(folder, "b_aniso.cif", make_cif([("C1", "C", 0, 0, 0)],
                                           cell="0.000001 1000000 1000000 90 90 90"))
    _write(folder, "c_good.cif", METHANE_CIF)
    out, npz = tmp_path / "s.csv", tmp_path / "f.npz"
    # One shipped model is enough to test the input handling; both tools side by side.
    predict = start_module("cryknn.predict", "--model_name=default", f"--out={out}", folder)
    featurize = start_module("cryknn.featurize", "--k=5", f"--out={npz}", folder)
    r = finish(predict)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "damaged" not in r.stderr + r.stdout
    assert "b_aniso" in r.stderr and "lattice images" in r.stderr
    rows = out.read_text()
    assert "nacl" in rows and "methane" in rows
    r = finish(featurize)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # skips are listed
    assert "lattice images" in r.stdout
    assert set(np.load(npz)["structure_id"]) == {"a_good:nacl", "c_good:methane"}


def test_isolated_featurisation_skips_only_the_bad_one():
    good = cif.Structure.from_arrays(np.eye(3) * 5, [[0, 0, 0]], [6])
    bad = cif.Structure.from_arrays(np.diag([1e-6, 1e6, 1e6]), [[0, 0, 0]], [6],
                                    id="bad:bad")
    kept, found, skips = neighbours.featurize_isolated([good, bad, good], 3)
    assert kept == [good, good] and len(found) == 2
    assert len(skips) == 1 and skips[0].block == "bad"


def test_a_search_outgrowing_the_block_limit_leaves_out_only_its_structure(monkeypatch):
    """A dense cluster and one lonely atom: the lonely atom's retry needs more candidates
    per block than the (lowered) limit. That structure is left out of the passes and
    reported; the others' results are exact, from one call (no bisection)."""
    monkeypatch.setattr(knn_plan, "MAX_BLOCK_CANDIDATES", 1024)
    rng = np.random.default_rng(0)
    cluster = np.concatenate([0.5 + rng.normal(0, 0.002, (300, 3)), [[0.0, 0.0, 0.0]]])
    small = [[0, 0, 0], [0.5, 0.5, 0.5]]
    structures = [cif.Structure.from_arrays(np.eye(3) * 5, small, [6, 8], id="a:a"),
                  cif.Structure.from_arrays(np.eye(3) * 200, cluster, [6] * 301, id="b:b"),
                  cif.Structure.from_arrays(np.diag([4.0, 5, 6]), small, [6, 8], id="c:c")]
    failures = {}
    found = neighbours.featurize(structures, 5, failures=failures)
    assert list(failures) == [1] and "candidates per block" in failures[1]
    assert found[1] is None
    for s, nb in ((structures[0], found[0]), (structures[2], found[2])):
        expected, _ = oracle.brute_force_knn(s.lattice, s.frac, 5)
        np.testing.assert_allclose(nb.distances, expected, atol=1e-4)
    with pytest.raises(errors.FeaturizeError, match="structure 1: the search"):
        neighbours.featurize(structures, 5)
    calls = []
    featurize = neighbours.featurize
    monkeypatch.setattr(neighbours, "featurize",
                        lambda *a, **kw: calls.append(1) or featurize(*a, **kw))
    kept, found, skips = neighbours.featurize_isolated(structures, 5)
    assert kept == [structures[0], structures[2]] and len(found) == 2 and len(calls) == 1
    assert [skip.block for skip in skips] == ["b"]
    assert skips[0].reason == failures[1]


# ----------------------------------------------------------------------------
# Model files: model.json checked against params.msgpack.


@pytest.fixture()
def shipped_copy(tmp_path):
    from cryknn import scoring

    folder = tmp_path / "model"
    shutil.copytree(os.path.join(scoring.PRETRAINED, "default"), folder)
    return folder


def _edit_json(folder, edit):
    path = folder / "model.json"
    info = json.loads(path.read_text())
    edit(info["run"])
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("edit,word", [
    (lambda run: run.__setitem__("input_mean", run["input_mean"][:-1]), "input_mean"),
    (lambda run: run["config"].__setitem__("k", 1000), "k"),
    (lambda run: run["config"].__setitem__("k", 6), "k = 6"),
    (lambda run: run["config"].__setitem__("width", 7), "params.msgpack"),
    (lambda run: run.__setitem__("atomic_numbers", run["atomic_numbers"][:-1]), "elements"),
    (lambda run: run.__setitem__("atomic_numbers", [999] * len(run["atomic_numbers"])),
     "atomic_numbers"),
])
def test_a_model_json_that_does_not_fit_its_params_is_refused(shipped_copy, edit, word):
    from cryknn import saved_model

    _edit_json(shipped_copy, edit)
    with pytest.raises(errors.ModelError) as e:
        saved_model.load(str(shipped_copy))
    assert "model.json" in str(e.value) and word in str(e.value)


def test_a_run_definition_that_does_not_fit_its_checkpoint_is_refused(toy_workdir, tmp_path):
    from cryknn import checkpoints

    workdir = shutil.copytree(toy_workdir, tmp_path / "w")
    shutil.rmtree(workdir / "model")
    path = workdir / "config.json"
    run = json.loads(path.read_text())
    run["config"]["width"] = 7
    path.write_text(json.dumps(run))
    with pytest.raises(errors.ModelError) as e:
        checkpoints.load_trained(str(workdir))
    assert "config.json" in str(e.value) and "checkpoint" in str(e.value)
