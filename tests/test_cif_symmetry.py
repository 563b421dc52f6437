"""Symmetry (cryknn.cif.symmetry): every source of operations, expansion and merging of
special positions against gemmi's own, unusable symmetry as a reasoned skip."""

import collections
import itertools

import gemmi
import numpy as np
import pytest

from cryknn.cif import ReadOptions
from tests.conftest import make_cif, read_one, skip_reason



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
