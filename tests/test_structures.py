"""CIF reading: hand-written CIFs for every rule, real archives, the shared COD set."""

import collections
import itertools
import types
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryknn import errors
from cryknn import structures
from cryknn.structures import ReadOptions, Skip, Structure, read_cif, read_cif_text
from tests.conftest import SHARED_COD, make_cif



def read_one(text, options=None):
    found, skips = read_cif_text(text, "t", options or ReadOptions())
    assert not skips, skips
    assert len(found) == 1
    check_structure(found[0])
    return found[0]


def skip_reason(text, options=None):
    found, skips = read_cif_text(text, "t", options or ReadOptions())
    assert not found
    assert len(skips) == 1
    return skips[0].reason


def check_structure(s: Structure):
    n = s.num_atoms
    assert n > 0
    assert s.lattice.shape == (3, 3) and s.lattice.dtype == np.float64
    assert s.frac.shape == (n, 3) and s.frac.dtype == np.float64
    assert np.all(s.frac >= 0) and np.all(s.frac < 1)
    assert s.numbers.shape == (n,) and s.numbers.dtype == np.int32
    assert np.all((s.numbers >= 1) & (s.numbers <= 118))
    assert s.labels.shape == (n,) and s.labels.dtype.kind == "U"
    assert s.occupancies.shape == (n,) and s.occupancies.dtype == np.float32
    assert s.volume > 0
    assert ":" in s.id


def min_image_distance(s, i, j):
    d = s.frac[i] - s.frac[j]
    return min(np.linalg.norm((d + shift) @ s.lattice)
               for shift in itertools.product((-1, 0, 1), repeat=3))


P21C_OPS = """loop_
_space_group_symop_operation_xyz
'x, y, z'
'-x, y+1/2, -z+1/2'
'-x, -y, -z'
'x, -y+1/2, z+1/2'
"""


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


def test_no_symmetry_information_is_p1():
    s = read_one(make_cif([["Na1", "Na", 0.1, 0.2, 0.3]]))
    assert s.num_atoms == 1


# --- symmetry -------------------------------------------------------------------------

def test_symmetry_operations_expand_and_merge_special_positions():
    sites = [["C1", "C", 0.1, 0.2, 0.3], ["Cu1", "Cu", 0, 0, 0], ["O1", "O", 0.5, 0, 0.5]]
    s = read_one(make_cif(sites, cell="5 6 7 90 100 90", symmetry=P21C_OPS))
    # general position: 4 copies; inversion centres 0,0,0 and 1/2,0,1/2: 2 copies each
    assert s.num_atoms == 8
    assert collections.Counter(s.labels.tolist()) == {"C1": 4, "Cu1": 2, "O1": 2}
    cu = np.flatnonzero(s.labels == "Cu1")
    np.testing.assert_allclose(s.frac[cu], [[0, 0, 0], [0, 0.5, 0.5]], atol=1e-12)


@pytest.mark.parametrize("symmetry", [
    P21C_OPS,
    "loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n-x,1/2+y,1/2-z\n-x,-y,-z\nx,1/2-y,1/2+z\n",
    "_space_group_name_Hall '-P 2ybc'",
    "_symmetry_space_group_name_Hall '-P 2ybc'",
    "_symmetry_space_group_name_H-M 'P 21/c'",
    "_space_group_name_H-M_alt 'P 1 21/c 1'",
    "_symmetry_space_group_name_H-M 'P2_1/c'",
    "_symmetry_space_group_name_H-M 'P2(1)/c'",
    "_space_group_IT_number 14",
])
def test_symmetry_sources_agree(symmetry):
    sites = [["C1", "C", 0.1, 0.2, 0.3], ["Cu1", "Cu", 0, 0, 0]]
    s = read_one(make_cif(sites, cell="5 6 7 90 100 90", symmetry=symmetry))
    reference = read_one(make_cif(sites, cell="5 6 7 90 100 90", symmetry=P21C_OPS))
    assert s.num_atoms == 6
    order_s = np.lexsort(np.round(s.frac, 6).T)
    order_r = np.lexsort(np.round(reference.frac, 6).T)
    np.testing.assert_allclose(s.frac[order_s], reference.frac[order_r], atol=1e-9)


def test_operations_win_over_symbols():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3]],
                    symmetry=P21C_OPS + "_symmetry_space_group_name_H-M 'P 1'\n")
    assert read_one(text).num_atoms == 4


def test_rock_salt_from_hm_symbol():
    s = read_one(make_cif([["Na1", "Na", 0, 0, 0], ["Cl1", "Cl", 0.5, 0.5, 0.5]],
                          cell="5.64 5.64 5.64 90 90 90",
                          symmetry="_symmetry_space_group_name_H-M 'F m -3 m'"))
    assert s.num_atoms == 8
    assert collections.Counter(s.numbers.tolist()) == {11: 4, 17: 4}
    assert min(min_image_distance(s, 0, j) for j in range(1, 8)) == pytest.approx(2.82)


def test_near_special_position_merges_within_tolerance():
    # 0.01 * 5 A = 0.05 A from the inversion centre: copies 0.1 A apart are one atom
    sites = [["Cu1", "Cu", 0.01, 0, 0]]
    s = read_one(make_cif(sites, symmetry=P21C_OPS))
    assert s.num_atoms == 2
    s = read_one(make_cif(sites, symmetry=P21C_OPS), ReadOptions(merge_tolerance=0.05))
    assert s.num_atoms == 4


@pytest.mark.parametrize("seed", range(12))
def test_expansion_matches_gemmi_on_random_groups(seed):
    """Count and positions of the expanded cell agree with gemmi's own expansion,
    with sites on special positions (coordinates 0, 1/4, 1/2, x, x)."""
    rng = np.random.default_rng(seed)
    groups = [sg for sg in gemmi.spacegroup_table() if sg.number > 1]
    sg = groups[rng.integers(len(groups))]
    cell = {"triclinic": "6 7 8 80 95 100", "monoclinic": "6 7 8 90 100 90",
            "orthorhombic": "6 7 8 90 90 90", "tetragonal": "7 7 8 90 90 90",
            "trigonal": "7 7 8 90 90 120", "hexagonal": "7 7 8 90 90 120",
            "cubic": "8 8 8 90 90 90"}[sg.crystal_system_str()]
    if sg.hm.startswith("R") and sg.ext == "R":
        cell = "7 7 7 70 70 70"
    params = [float(v) for v in cell.split()]
    choices = [0.0, 0.25, 0.5]
    sites = []
    for k in range(6):
        x, y, z = rng.random(3).round(4)
        if k % 3 == 1:
            x, y = rng.choice(choices, 2)
        elif k % 3 == 2:
            y = x
            z = rng.choice(choices)
        sites.append([f"C{k}", "C", x, y, z])
    ops = "loop_\n_symmetry_equiv_pos_as_xyz\n" + "\n".join(
        f"'{op.triplet()}'" for op in sg.operations())
    s = read_one(make_cif(sites, cell=cell, symmetry=ops), ReadOptions(merge_duplicates=False))

    small = gemmi.SmallStructure()
    small.cell = gemmi.UnitCell(*params)
    small.spacegroup_hm = sg.xhm()
    small.determine_and_set_spacegroup("1")
    for label, _, x, y, z in sites:
        site = gemmi.SmallStructure.Site()
        site.label, site.fract, site.element = label, gemmi.Fractional(x, y, z), gemmi.Element("C")
        small.add_site(site)
    expected = small.get_all_unit_cell_sites()
    assert s.num_atoms == len(expected), sg.xhm()
    for label in {row[0] for row in sites}:
        mine = s.frac[s.labels == label]
        theirs = np.array([[a.fract.x, a.fract.y, a.fract.z] for a in expected if a.label == label])
        assert len(mine) == len(theirs)
        d = mine[:, None, :] - theirs[None, :, :]
        d -= np.rint(d)
        dist = np.linalg.norm(d @ s.lattice, axis=-1)
        # every atom of one expansion has a partner within the merge tolerance in the other
        assert dist.min(axis=1).max() < 0.4 and dist.min(axis=0).max() < 0.4, sg.xhm()


@pytest.mark.parametrize("symmetry, reason", [
    ("_symmetry_space_group_name_H-M 'P 42/xyz'", "unrecognised space group: H-M symbol"),
    ("_space_group_name_Hall 'garbage'", "unrecognised space group: Hall symbol"),
    ("loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n'2x,y'\n", "bad operation"),
    ("loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n-x,-y,z\nx,-y,-z\n", "not closed"),
    ("loop_\n_symmetry_equiv_pos_as_xyz\n-x,-y,-z\n", "identity"),
    ("_space_group_IT_number 999", "space group number 999"),
])
def test_unusable_symmetry_is_skipped(symmetry, reason):
    assert reason in skip_reason(make_cif([["C1", "C", 0.1, 0.2, 0.3]], symmetry=symmetry))


def test_unquoted_space_group_name_is_repaired():
    # invalid CIF (a value with spaces needs quotes), written by some CoRE MOF entries
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3]], symmetry="_symmetry_space_group_name_H-M P 21/c")
    assert read_one(text).num_atoms == 4


def test_bad_operations_fall_back_to_symbol():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3]],
                    symmetry="loop_\n_symmetry_equiv_pos_as_xyz\n'x,y'\n"
                             "_symmetry_space_group_name_H-M 'P -1'")
    assert read_one(text).num_atoms == 2


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


def test_iter_cif_paths_recursive_sorted(tmp_path):
    for rel in ["b/z.cif", "b/a.CIF", "a/c.cif", "a/notes.txt", "top.cif", "a/deep/x.Cif"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make_cif([["C1", "C", 0.1, 0.2, 0.3]], block=path.stem))
    expected = [tmp_path / r for r in ["a/c.cif", "a/deep/x.Cif", "b/a.CIF", "b/z.cif", "top.cif"]]
    assert list(structures.iter_cif_paths([tmp_path])) == expected
    single = tmp_path / "a" / "notes.txt"
    assert list(structures.iter_cif_paths([single, tmp_path / "b"])) == [
        single, tmp_path / "b/a.CIF", tmp_path / "b/z.cif"]
    stream = structures.iter_structures([tmp_path, tmp_path / "nope.cif"])
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
    for policy in structures.DISORDER_POLICIES:
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


# --- disorder -------------------------------------------------------------------------

OCC_COLUMNS = ["label", "type_symbol", "fract_x", "fract_y", "fract_z", "occupancy"]
GROUP_COLUMNS = OCC_COLUMNS + ["disorder_assembly", "disorder_group"]


def test_partial_occupancy_policies():
    sites = [["Zn1", "Zn", 0.5, 0.5, 0.5, "1.0"],
             ["C1", "C", 0.10, 0.2, 0.3, "0.6"],   # split position, 0.3 A apart
             ["C1B", "C", 0.16, 0.2, 0.3, "0.4"],
             ["Fe1", "Fe", 0.7, 0.7, 0.2, "0.5"],  # mixed site
             ["Mg1", "Mg", 0.7, 0.7, 0.2, "0.5"],
             ["Ow1", "O", 0.3, 0.8, 0.8, "0.3"],   # isolated low-occupancy water
             ["N1", "N", 0.9, 0.1, 0.6, "0.5"],    # isolated half-occupied site
             ["Cl1", "Cl", 0.5, 0.55, 0.5, "0.5"]]  # overlaps the full Zn1
    text = make_cif(sites, site_columns=OCC_COLUMNS)
    s = read_one(text)
    assert s.labels.tolist() == ["Zn1", "C1", "Fe1", "N1"]
    np.testing.assert_allclose(s.occupancies, [1.0, 0.6, 0.5, 0.5])
    everything = read_one(text, ReadOptions(disorder="all"))
    assert everything.labels.tolist() == [row[0] for row in sites]
    np.testing.assert_allclose(everything.occupancies, [float(r[5]) for r in sites])
    assert skip_reason(text, ReadOptions(disorder="drop")) == (
        "disorder: 7 partially occupied site(s) (disorder='drop')")


def test_occupancy_tolerance_and_nulls():
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3, "0.995"], ["C2", "C", 0.5, 0.2, 0.3, "?"]],
                    site_columns=OCC_COLUMNS)
    s = read_one(text, ReadOptions(disorder="drop"))
    np.testing.assert_allclose(s.occupancies, [0.995, 1.0], rtol=1e-6)
    text = make_cif([["C1", "C", 0.1, 0.2, 0.3, "-0.5"]], site_columns=OCC_COLUMNS)
    assert "negative occupancy" in skip_reason(text)


def test_disorder_groups_keep_majority_group():
    sites = [["C1", "C", 0.1, 0.1, 0.1, "1", ".", "."],
             ["C2A", "C", 0.3, 0.3, 0.3, "0.3", "A", "1"],
             ["C3A", "C", 0.4, 0.3, 0.3, "0.3", "A", "1"],
             ["C2B", "C", 0.3, 0.33, 0.3, "0.7", "A", "2"],
             ["C3B", "C", 0.4, 0.33, 0.3, "0.7", "A", "2"],
             ["O1A", "O", 0.7, 0.7, 0.7, "0.55", "B", "1"],
             ["O1B", "O", 0.7, 0.8, 0.7, "0.45", "B", "2"]]
    text = make_cif(sites, site_columns=GROUP_COLUMNS)
    assert read_one(text).labels.tolist() == ["C1", "C2B", "C3B", "O1A"]
    assert len(read_one(text, ReadOptions(disorder="all")).labels) == 7
    assert skip_reason(text, ReadOptions(disorder="drop")) == (
        "disorder: 6 partially occupied site(s) and 6 site(s) in disorder groups "
        "(disorder='drop')")


def test_disorder_group_without_occupancy_below_one_still_counts_for_drop():
    sites = [["C1", "C", 0.1, 0.1, 0.1, "1", ".", "1"], ["C2", "C", 0.5, 0.1, 0.1, "1", ".", "2"]]
    text = make_cif(sites, site_columns=GROUP_COLUMNS)
    assert skip_reason(text, ReadOptions(disorder="drop")) == (
        "disorder: 2 site(s) in disorder groups (disorder='drop')")
    assert read_one(text).labels.tolist() == ["C1"]  # equal means: first group wins


def test_split_site_across_a_mirror_keeps_one_copy():
    # x = 0.05 next to the mirror x = 0 of P m (copies 2 * 0.05 * 5 A = 0.5 A apart)
    ops = "loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n-x,y,z\n"
    text = make_cif([["K1", "K", 0.05, 0.2, 0.3, "0.5"]], symmetry=ops, site_columns=OCC_COLUMNS)
    assert read_one(text).num_atoms == 1
    assert read_one(text, ReadOptions(disorder="all")).num_atoms == 2


def test_everything_dropped_is_a_skip():
    text = make_cif([["Ow1", "O", 0.3, 0.8, 0.8, "0.2"]], site_columns=OCC_COLUMNS)
    assert skip_reason(text).startswith("no atoms left after resolving disorder")


# --- duplicates -----------------------------------------------------------------------

def test_duplicate_atoms_from_different_sites_merge():
    sites = [["C1", "C", 0.0, 0.2, 0.3], ["C1'", "C", 1.0, 0.2, 0.3001],
             ["N1", "N", 0.0, 0.2, 0.3], ["C2", "C", 0.5, 0.5, 0.5]]
    text = make_cif(sites)
    assert read_one(text).labels.tolist() == ["C1", "N1", "C2"]
    assert read_one(text, ReadOptions(merge_duplicates=False)).num_atoms == 4


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
        i, j, _ = structures._close_pairs(frac, lattice, cutoff)
        expected = set()
        for shift in itertools.product((-1, 0, 1), repeat=3):
            d = np.linalg.norm((frac[:, None] - frac[None] + shift) @ lattice, axis=-1)
            expected |= {(a, b) for a, b in zip(*np.nonzero(d < cutoff)) if a < b}
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(expected)
        assert list(zip(i.tolist(), j.tolist())) == sorted(expected)  # sorted by (i, j)


def test_read_options_validation():
    with pytest.raises(ValueError, match="disorder"):
        ReadOptions(disorder="mostly")
    with pytest.raises(ValueError, match="merge_tolerance"):
        ReadOptions(merge_tolerance=float("nan"))


# --- embedded data sets ---------------------------------------------------------------

def test_core_mof_sample():
    try:
        items = list(structures.iter_core_mof("2019-ASR", limit=50))
    except errors.DataNotFoundError:
        pytest.skip("core-mof is not installed")
    found = [i for i in items if isinstance(i, Structure)]
    assert len(items) >= 50 and len(found) >= 45
    sources = {i.source if isinstance(i, Structure) else i.file for i in items}
    assert len(sources) == 50
    for s in found:
        check_structure(s)
        archive, member = s.source.split("!")
        assert archive == "2019-ASR.tar.xz"
        assert s.id.split(":")[0] == Path(member).stem
    assert len({s.id for s in found}) == len(found)


def test_core_mof_errors():
    with pytest.raises(errors.DataNotFoundError, match="unknown CoRE MOF version"):
        next(structures.iter_core_mof("2020"))


def test_missing_packages_raise_data_not_found(monkeypatch):
    real_find_spec = structures.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("CoRE_MOF", "pyxtal") else real_find_spec(name, *args)
    monkeypatch.setattr(structures.importlib.util, "find_spec", find_spec)
    with pytest.raises(errors.DataNotFoundError, match="pip install core-mof"):
        next(structures.iter_core_mof())
    with pytest.raises(errors.DataNotFoundError, match="pip install pyxtal"):
        structures.read_pyxtal_db()


def test_pyxtal_db():
    try:
        found = structures.read_pyxtal_db()
    except errors.DataNotFoundError:
        pytest.skip("pyxtal is not installed")
    assert len(found) == 100
    assert len({s.id for s in found}) == 100
    assert all(s.id.startswith("test:") for s in found)
    for s in found:
        check_structure(s)
    ase_db = pytest.importorskip("ase.db")
    with ase_db.connect(str(structures.pyxtal_db_path())) as db:
        atoms = db.get(id=1).toatoms()
    first = found[0]
    np.testing.assert_array_equal(first.numbers, atoms.numbers)
    np.testing.assert_allclose(first.lattice, atoms.cell[:])
    np.testing.assert_allclose(first.frac, atoms.get_scaled_positions(wrap=True) % 1.0,
                               atol=1e-9)


# --- the shared COD set ---------------------------------------------------------------

@pytest.mark.skipif(not SHARED_COD.is_dir(), reason="../shared/data/cod is absent")
def test_cod_folder_reads_without_exceptions():
    per_file = collections.Counter()
    found, skips = [], []
    for item in structures.iter_structures([SHARED_COD]):
        per_file[item.source if isinstance(item, Structure) else item.file] += 1
        (found if isinstance(item, Structure) else skips).append(item)
    paths = list(structures.iter_cif_paths([SHARED_COD]))
    assert set(per_file) == {str(p) for p in paths}  # every file yields something
    assert len(found) > 400
    for s in found:
        check_structure(s)
    for skip in skips:
        assert skip.reason and "\n" not in skip.reason
        assert not skip.reason.startswith("unexpected error"), skip
