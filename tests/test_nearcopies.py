"""Near-copy groups (cryknn.nearcopies) on constructed cases, and in a cif_dir build."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cryknn import datasets
from cryknn import families
from cryknn import nearcopies as nc
from cryknn import cif
from cryknn.datasets import crystal_structures as names
from tests.conftest import make_cif


def _fcc(a):
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return np.eye(3) * a, frac


def _bcc(a):
    return np.eye(3) * a, np.array([[0, 0, 0], [0.5, 0.5, 0.5]])


def _rocksalt(a=5.64):
    lattice, fcc = _fcc(a)
    frac = np.concatenate([fcc, (fcc + 0.5) % 1.0])
    return lattice, frac, np.array([11] * 4 + [17] * 4)


def _structure(sid, lattice, frac, numbers):
    return cif.Structure.from_arrays(lattice, frac, numbers, id=sid)


def _pairs(*structs):
    return {tuple(p) for p in nc.near_copy_pairs(nc.fingerprints(structs)).tolist()}


def test_composition_key_is_the_reduced_formula():
    assert nc.composition_key(np.array([6, 1, 1, 1, 1])) == "1:4,6:1"
    assert nc.composition_key(np.array([6, 6, 1] * 4)) == "1:1,6:2"
    assert nc.composition_key(np.array([29] * 4)) == "29:1"


def test_another_setting_of_one_cell_is_a_near_copy():
    """Rock salt as its conventional cube, and as a skewed supercell shifted in origin."""
    lattice, frac, numbers = _rocksalt()
    change = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 2]])  # det 2: a supercell, sheared
    new_lattice = change @ lattice
    # All points of the new cell: the old motif plus the lattice vectors inside it.
    cart = np.concatenate([(frac + t) @ lattice for t in np.ndindex(3, 3, 3)])
    new_frac = cart @ np.linalg.inv(new_lattice)
    keep = np.all((new_frac > -1e-9) & (new_frac < 1 - 1e-9), axis=1)
    z = np.tile(numbers, 27)[keep]
    assert keep.sum() == 16
    shifted = (new_frac[keep] + 0.123) % 1.0
    a = _structure("AAAAAA:a", lattice, frac, numbers)
    b = _structure("BBBBBB:b", new_lattice, shifted, z)
    fa, fb = nc.fingerprints([a]), nc.fingerprints([b])
    np.testing.assert_allclose(fa.amd, fb.amd, rtol=1e-5)
    assert _pairs(a, b) == {(0, 1)}


def test_a_slightly_expanded_copy_is_a_near_copy_and_a_far_one_is_not():
    lattice, frac, numbers = _rocksalt()
    a = _structure("AAAAAA:a", lattice, frac, numbers)
    b = _structure("BBBBBB:b", lattice * 1.005, frac, numbers)
    c = _structure("CCCCCC:c", lattice * 1.08, frac, numbers)
    assert _pairs(a, b, c) == {(0, 1)}


def test_polymorphs_with_other_environments_stay_apart():
    """fcc and bcc copper at the same volume per atom: same composition and density, but
    12 first neighbours against 8 + 6: not near-copies."""
    lattice_f, frac_f = _fcc(3.61)
    a_bcc = (3.61 ** 3 / 4 * 2) ** (1 / 3)
    lattice_b, frac_b = _bcc(a_bcc)
    fcc = _structure("AAAAAA:fcc", lattice_f, frac_f, np.full(4, 29))
    bcc = _structure("BBBBBB:bcc", lattice_b, frac_b, np.full(2, 29))
    assert abs(fcc.volume / 4 - bcc.volume / 2) < 1e-9
    assert _pairs(fcc, bcc) == set()


def test_other_composition_is_never_a_near_copy():
    lattice, frac, numbers = _rocksalt()
    a = _structure("AAAAAA:a", lattice, frac, numbers)
    b = _structure("BBBBBB:b", lattice, frac, np.where(numbers == 11, 19, 17))  # KCl geometry
    assert _pairs(a, b) == set()


def test_pairs_against_a_reference():
    lattice, frac, numbers = _rocksalt()
    query = nc.fingerprints([_structure("Q:q", lattice * 1.01, frac, numbers),
                             _structure("R:r", *_bcc(3.0), np.full(2, 29))])
    reference = nc.fingerprints([_structure("S:s", *_fcc(3.6), np.full(4, 29)),
                                 _structure("T:t", lattice, frac, numbers)])
    assert nc.copies_of(query, reference, {"T:t": "train"}) == [("Q:q", "T:t", "train")]


def _families_in(split_a, split_b):
    """Two refcode-like family names whose own splits are split_a and split_b."""
    names_ = ["QXRT" + a + b for a in "ABCDEFGHIJKLMNOP" for b in "ABCDEFGHIJKLMNOP"]
    first = next(n for n in names_ if families.split_of(n) == split_a)
    second = next(n for n in names_ if families.split_of(n) == split_b and n > first)
    return first, second


def test_groups_join_families_and_take_the_smallest_members_split():
    lattice, frac, numbers = _rocksalt()
    f1, f2 = _families_in("train", "test")
    structs = [_structure(f"{f2}_clean:x", lattice * 1.002, frac, numbers),
               _structure(f"{f1}:y", lattice, frac, numbers),
               _structure(f"{f1}01:z", *_bcc(3.0), np.full(2, 29)),  # same family as f1
               _structure("ZZZZZZ:w", *_fcc(3.6), np.full(4, 29))]  # unrelated
    table = nc.split_table(nc.fingerprints(structs))
    rows = {r[0]: r for r in table.rows}
    group = min(f1, f2)
    assert rows[f"{f2}_clean:x"][2] == rows[f"{f1}:y"][2] == rows[f"{f1}01:z"][2] == group
    assert {rows[s][3] for s in (f"{f2}_clean:x", f"{f1}:y", f"{f1}01:z")} == {
        families.split_of(group)}
    assert rows["ZZZZZZ:w"][2:] == ("ZZZZZZ", families.split_of("ZZZZZZ"),
                                    families.split_of("ZZZZZZ"))
    assert table.moved == 1 and table.pairs == 1
    # An unrelated structure coming or going does not move anyone.
    again = nc.split_table(nc.fingerprints(structs[:3]))
    assert [r[3] for r in again.rows] == [r[3] for r in table.rows[:3]]


def test_unfeaturisable_structures_match_nothing():
    lattice, frac, numbers = _rocksalt()
    flat = np.array([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]])  # degenerate cell
    fp = nc.fingerprints([_structure("A:a", flat, frac, numbers),
                          _structure("B:b", flat, frac, numbers)])
    assert np.isnan(fp.amd).all() and nc.near_copy_pairs(fp).shape == (0, 2)


def test_fingerprints_round_trip(tmp_path):
    lattice, frac, numbers = _rocksalt()
    fp = nc.fingerprints([_structure("A:a", lattice, frac, numbers)])
    fp.save(str(tmp_path / "f.npz"))
    back = nc.Fingerprints.load(str(tmp_path / "f.npz"))
    assert back.ids.tolist() == ["A:a"] and back.amd.shape == (1, nc.AMD_K)
    np.testing.assert_array_equal(back.amd, fp.amd)


# --------------------------------------------------------------------------------------
# In a build: the split follows the group; splits.csv and build_info say so.


def _rocksalt_cif(block, a):
    return make_cif([("Na1", "Na", 0, 0, 0), ("Cl1", "Cl", 0.5, 0.5, 0.5)],
                    cell=f"{a} {a} {a} 90 90 90", block=block,
                    symmetry="_space_group_name_H-M_alt 'F m -3 m'")


@pytest.fixture(scope="module")
def near_copy_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("nearcopy_cifs")
    f1, f2 = _families_in("train", "test")
    f3, f4 = _families_in("validation", "test")
    files = {f"{f1}.cif": _rocksalt_cif(f1, 5.64), f"{f2}.cif": _rocksalt_cif(f2, 5.66),
             f"{f3}.cif": make_cif([("Cu1", "Cu", 0, 0, 0)], cell="3.61 3.61 3.61 90 90 90",
                                   block=f3, symmetry="_space_group_name_H-M_alt 'F m -3 m'"),
             f"{f4}.cif": make_cif([("Cu1", "Cu", 0, 0, 0)], cell="2.87 2.87 2.87 90 90 90",
                                   block=f4, symmetry="_space_group_name_H-M_alt 'I m -3 m'")}
    for name, text in files.items():
        (root / name).write_text(text)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    lines = []
    datasets.build("crystal_structures/cif_dir", data_dir, manual_dir=str(root),
                   num_workers=0, log=lines.append)
    folder = os.path.join(data_dir, "crystal_structures", "cif_dir", names.VERSION)
    return (f1, f2, f3, f4), data_dir, folder, "\n".join(lines)


def test_build_puts_near_copies_in_one_split(near_copy_build):
    (f1, f2, f3, f4), data_dir, folder, log = near_copy_build
    rows = {r["structure_id"].split(":")[0]: r
            for r in nc.read_splits_csv(os.path.join(folder, nc.SPLITS_CSV))}
    assert list(nc.read_splits_csv(os.path.join(folder, nc.SPLITS_CSV))[0]) == list(
        nc.SPLITS_FIELDS)
    assert rows[f2]["group"] == rows[f1]["group"] == min(f1, f2)
    assert rows[f1]["split"] == rows[f2]["split"] == families.split_of(min(f1, f2))
    assert rows[f3]["group"] == f3 and rows[f4]["group"] == f4  # fcc and bcc Cu: apart
    got = {split: {ex["id"].split(":")[0] for ex in datasets.load_split(
        "crystal_structures/cif_dir", split, data_dir, build_if_missing=False)}
        for split in {r["split"] for r in rows.values()}}
    for split, stems in got.items():
        assert stems == {stem for stem, r in rows.items() if r["split"] == split}
    info = json.load(open(os.path.join(folder, names.BUILD_INFO_JSON)))
    assert info["near_copies"]["structures_moved"] == 1
    assert info["near_copies"]["pairs"] == 1
    assert "1 moved split" in log


def test_build_records_site_index(near_copy_build):
    (f1, *_), data_dir, folder, _ = near_copy_build
    split = next(r["split"] for r in nc.read_splits_csv(os.path.join(folder, nc.SPLITS_CSV))
                 if r["structure_id"].startswith(f1))
    found = [s for s in datasets.load_structures("crystal_structures/cif_dir", split, data_dir,
                                                 build_if_missing=False)
             if s.id.startswith(f1)]
    # rock salt from two sites: 4 Na copies of row 0, 4 Cl copies of row 1
    assert sorted(found[0].site_index.tolist()) == [0] * 4 + [1] * 4
