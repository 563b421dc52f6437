"""Reading policies (cryknn.cif.options, disorder): partial occupancy, disorder groups,
duplicate atoms, option validation."""

import numpy as np
import pytest

from cryknn.cif import ReadOptions
from tests.conftest import make_cif, read_one, skip_reason



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


# --- options --------------------------------------------------------------------------

def test_read_options_validation():
    with pytest.raises(ValueError, match="disorder"):
        ReadOptions(disorder="mostly")
    with pytest.raises(ValueError, match="merge_tolerance"):
        ReadOptions(merge_tolerance=float("nan"))
