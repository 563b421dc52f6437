"""CIF reading (cryknn.cif.reader, sites, cell): hand-written CIFs for every rule, files and
folders, the close-pair search, the shared COD set."""

import collections
import itertools
import types

import gemmi
import numpy as np
import pytest

from cryknn import cif
from cryknn.cif import ReadOptions, Skip, Structure, read_cif, read_cif_text
from cryknn.cif.cell import close_pairs
from tests.conftest import SHARED_COD, check_structure, make_cif, read_one, skip_reason


# --- P1, lattice, ids ----------------------------------------------------------------

def test_p1_block_and_lattice():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3], ["O1", "O", -0.1, 1.25, 0.5]],
                    cell="5 6 7 80 95 100", block="abc")
    s = read_one(text)
    assert s.id == "t:abc" and s.source == "t"
    np.testing.assert_array_equal(s.numbers, [6, 8])
    np.testing.assert_array_equal(s.labels, ["C1", "O1"])
    np.testing.assert_allclose(s.frac, [[0.1, 0.2, 0.3], [0.9, 0.25, 0.5]], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(s.lattice, axis=1), [5, 6, 7])

    def angle(u, v):
        return np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    a, b, c = s.lattice
    np.testing.assert_allclose([angle(b, c), angle(a, c), angle(a, b)], [80, 95, 100])
    cell = gemmi.UnitCell(5, 6, 7, 80, 95, 100)
    expected = cell.orthogonalize(gemmi.Fractional(0.1, 0.2, 0.3))
    np.testing.assert_allclose(s.cart[0], [expected.x, expected.y, expected.z])
    np.testing.assert_allclose(s.occupancies, [1, 1])


def test_uncertainties_fractions_and_label_only_sites():
    text = make_cif([["Fe1", "0.25(3)", "1/4", ".5"], ["O12", "0.1", "0.2", "0.3"]],
                    site_columns=["label", "fract_x", "fract_y", "fract_z"])
    s = read_one(text)
    np.testing.assert_array_equal(s.numbers, [26, 8])
    np.testing.assert_allclose(s.frac[0], [0.25, 0.25, 0.5])


# --- blocks and files -----------------------------------------------------------------

def test_multi_block_file(tmp_path):
    text = ("data_global\n_journal_year 2001\n"
            + make_cif([["C1", "C", 0.1, 0.2, 0.3]], block="first")
            + make_cif([["N1", "N", 0.1, 0.2, 0.3], ["N2", "N", 0.6, 0.2, 0.3]], block="second"))
    path = tmp_path / "multi.cif"
    path.write_text(text)
    found, skips = read_cif(path)
    assert [s.id for s in found] == ["multi:first", "multi:second"]
    assert [s.num_atoms for s in found] == [1, 2]
    assert all(s.source == str(path) for s in found)
    assert skips == [Skip(str(path), "global", "no atom sites")]


def test_broken_syntax_is_a_skip_not_a_crash():
    for text in ["garbage without header", "data_x\nloop_\n_a\n_b\n1 2 3\n", "data_x\n'unclosed\n",
                 b"\x00\xff\xfe binary", b"data_x\n_cell_length_a 5\x00\n"]:
        found, skips = read_cif_text(text, "bad")
        assert not found
        assert len(skips) == 1 and skips[0].block == ""
        assert skips[0].reason.startswith("CIF parse error")


def test_empty_text_and_non_utf8():
    assert read_cif_text("", "e")[1][0].reason == "no data blocks"
    latin1 = make_cif([["C1", "C", 0.1, 0.2, 0.3]]).replace(
        "data_test", "data_test\n_publ_author_name 'M\xfcller'").encode("latin-1")
    found, skips = read_cif_text(latin1, "l")
    assert len(found) == 1 and not skips


def test_duplicate_block_names_and_tags():
    block = make_cif([["C1", "C", 0.1, 0.2, 0.3]], block="same")
    found, skips = read_cif_text(block + block, "dup")
    assert [s.id for s in found] == ["dup:same"]
    assert "duplicate data block name" in skips[0].reason
    text = block.replace("_cell_length_a 5", "_cell_length_a 5\n_cell_length_a 6")
    assert "duplicate tag _cell_length_a" in skip_reason(text)
    harmless = block.replace("data_same", "data_same\n_journal_year 1\n_journal_year 2")
    assert read_one(harmless).num_atoms == 1


def test_unreadable_file_is_a_skip(tmp_path):
    found, skips = read_cif(tmp_path / "missing.cif")
    assert not found and "cannot read file" in skips[0].reason
    found, skips = read_cif(tmp_path)  # a folder
    assert not found and "cannot read file" in skips[0].reason


def test_file_size_limit_is_read_from_the_reader_module(tmp_path, monkeypatch):
    # featurize and predict set --max_file_mb on cif.reader (the package does not copy it)
    path = tmp_path / "c.cif"
    path.write_text(make_cif([["C1", "C", 0.1, 0.2, 0.3]]))
    assert read_cif(path)[0]
    monkeypatch.setattr(cif.reader, "MAX_FILE_BYTES", 10)
    found, skips = read_cif(path)
    assert not found and skips[0].reason.startswith("file larger than")


def test_iter_cif_paths_recursive_sorted(tmp_path):
    for rel in ["b/z.cif", "b/a.CIF", "a/c.cif", "a/notes.txt", "top.cif", "a/deep/x.Cif"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make_cif([["C1", "C", 0.1, 0.2, 0.3]], block=path.stem))
    expected = [tmp_path / r for r in ["a/c.cif", "a/deep/x.Cif", "b/a.CIF", "b/z.cif", "top.cif"]]
    assert list(cif.iter_cif_paths([tmp_path])) == expected
    single = tmp_path / "a" / "notes.txt"
    assert list(cif.iter_cif_paths([single, tmp_path / "b"])) == [
        single, tmp_path / "b/a.CIF", tmp_path / "b/z.cif"]
    stream = cif.iter_structures([tmp_path, tmp_path / "nope.cif"])
    assert isinstance(stream, types.GeneratorType)
    items = list(stream)
    assert [i.id for i in items if isinstance(i, Structure)] == [
        "c:c", "x:x", "a:a", "z:z", "top:top"]
    assert [i.reason[:16] for i in items if isinstance(i, Skip)] == ["cannot read file"]


# --- elements -------------------------------------------------------------------------

def test_deuterium_policy():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3], ["D1", "D", 0.2, 0.2, 0.3]])
    np.testing.assert_array_equal(read_one(text).numbers, [6, 1])
    reason = skip_reason(text, ReadOptions(isotopes_as_hydrogen=False))
    assert reason == "hydrogen isotope 'D' (isotopes_as_hydrogen=False) at site 'D1'"


@pytest.mark.parametrize("label, type_symbol, reason", [
    ("X1", "X", "unknown element type 'X' at site 'X1'"),
    ("A1", "?", "unknown element type '?' at site 'A1'"),
    ("Du1", "Du", "unknown element type 'Du' at site 'Du1'"),
    ("Q1", "Q", "unknown element type 'Q' at site 'Q1'"),
])
def test_unknown_elements_skip(label, type_symbol, reason):
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3], [label, type_symbol, 0.5, 0.5, 0.5]])
    for policy in cif.DISORDER_POLICIES:
        assert skip_reason(text, ReadOptions(disorder=policy)) == reason


def test_dummy_flag_skips():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3, "d"], ["Cp1", "C", 0.5, 0.5, 0.5, "dum"]],
                    site_columns=["label", "type_symbol", "fract_x", "fract_y", "fract_z",
                                  "calc_flag"])
    assert "dummy atom at site 'Cp1'" in skip_reason(text)


# --- cells and coordinates ------------------------------------------------------------

@pytest.mark.parametrize("cell, reason", [
    (None, "no unit cell"),
    ("5 6 7 90 90", "incomplete unit cell: missing _cell_angle_gamma"),
    ("5 ? 7 90 90 90", "_cell_length_b is not a number"),
    ("5 0 7 90 90 90", "non-positive cell length _cell_length_b"),
    ("5 6 -7 90 90 90", "non-positive cell length _cell_length_c"),
    ("5 6 7 90 190 90", "outside (0, 180)"),
    ("5 6 7 10 10 100", "no positive volume"),
])
def test_bad_cells_skip(cell, reason):
    assert reason in skip_reason(make_cif([["C1", "C", 0.1, 0.2, 0.3]], cell=cell))


def test_missing_sites_and_coordinates():
    assert skip_reason("data_x\n_cell_length_a 5\n") == "no atom sites"
    text = make_cif([["C1", "C", 0.1, "?", 0.3], ["C2", "C", 0.1, 0.2, 0.3]])
    assert "missing or non-numeric coordinates at site 'C1'" in skip_reason(text)
    text = make_cif([["?", "?", "?"]], site_columns=["label", "fract_x", "fract_y"])
    assert "lack _atom_site_fract_z" in skip_reason(text)
    text = make_cif([["?", "?", "?", "?"]], site_columns=["label", "fract_x", "fract_y", "fract_z"])
    assert skip_reason(text).startswith("no atom sites")
    text = make_cif([["C1", 1, 2, 3]], site_columns=["label", "Cartn_x", "Cartn_y", "Cartn_z"])
    assert "Cartesian coordinates only" in skip_reason(text)


# --- close pairs ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_close_pairs_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        lattice = rng.normal(size=(3, 3)) * rng.uniform(1, 6)
        if abs(np.linalg.det(lattice)) < 1:
            continue
        n = int(rng.integers(2, 80))
        frac = rng.random((n, 3))
        spacing = 1 / np.linalg.norm(np.linalg.inv(lattice), axis=0)
        cutoff = rng.uniform(0.05, 0.49) * spacing.min()  # down to 2 bins per axis
        i, j, _ = close_pairs(frac, lattice, cutoff)
        expected = set()
        for shift in itertools.product((-1, 0, 1), repeat=3):
            d = np.linalg.norm((frac[:, None] - frac[None] + shift) @ lattice, axis=-1)
            expected |= {(a, b) for a, b in zip(*np.nonzero(d < cutoff)) if a < b}
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(expected)
        assert list(zip(i.tolist(), j.tolist())) == sorted(expected)  # sorted by (i, j)


# --- the shared COD set ---------------------------------------------------------------

@pytest.mark.skipif(not SHARED_COD.is_dir(), reason="../shared/data/cod is absent")
def test_cod_folder_reads_without_exceptions():
    per_file = collections.Counter()
    found, skips = [], []
    for item in cif.iter_structures([SHARED_COD]):
        per_file[item.source if isinstance(item, Structure) else item.file] += 1
        (found if isinstance(item, Structure) else skips).append(item)
    paths = list(cif.iter_cif_paths([SHARED_COD]))
    assert set(per_file) == {str(p) for p in paths}  # every file yields something
    assert len(found) > 400
    for s in found:
        check_structure(s)
    for skip in skips:
        assert skip.reason and "\n" not in skip.reason
        assert not skip.reason.startswith("unexpected error"), skip
