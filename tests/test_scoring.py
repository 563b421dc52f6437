"""Scoring structures (cryknn.scoring.Model): one row per CIF site, labels made unique,
multiplicities that add up to the unit cell, typed pandas tables."""

from __future__ import annotations

import numpy as np
import pytest

import cryknn
from cryknn import cif
from cryknn import site_scores
from cryknn.cif import read_cif_text
from tests.conftest import METHANE_CIF, NACL_CIF, make_cif

# A P1 file as COF exporters write them: every carbon is labelled 'C'.
REPEATED_LABELS_CIF = make_cif([("C", "C", 0.10, 0.10, 0.10), ("C", "C", 0.30, 0.10, 0.10),
                                ("C", "C", 0.50, 0.10, 0.10), ("H", "H", 0.10, 0.30, 0.10),
                                ("O", "O", 0.70, 0.60, 0.50)],
                               cell="7 7 7 90 90 90", block="cof",
                               symmetry="_symmetry_space_group_name_H-M 'P 1'")


def test_repeated_labels_give_one_row_per_site(toy_workdir):
    found, _ = cif.read_cif_text(REPEATED_LABELS_CIF, "cof")
    (score,) = cryknn.load_model(toy_workdir).score(found)
    assert [s.site_label for s in score.sites] == ["C#1", "C#2", "C#3", "H", "O"]
    assert [s.site_row for s in score.sites] == [1, 2, 3, 4, 5]
    frame = cryknn.load_model(toy_workdir).score(found).to_pandas()
    assert len(frame) == 5 and list(frame["multiplicity"]) == [1] * 5


def test_multiplicities_add_up_to_the_unit_cell(toy_workdir):
    found, _ = cif.read_cif_text(NACL_CIF, "nacl")
    model = cryknn.load_model(toy_workdir)
    (score,) = model.score(found)
    assert [(s.site_label, s.multiplicity) for s in score.sites] == [("Na1", 4), ("Cl1", 4)]
    (per_atom,) = model.score(found, per_atom=True)
    assert len(per_atom.sites) == 8 and {s.atom_index for s in per_atom.sites} == set(range(8))


def test_to_pandas_is_typed_with_nan_for_missing(toy_workdir):
    pytest.importorskip("pandas")
    found, _ = read_cif_text(METHANE_CIF, "methane")
    scores = cryknn.load_model(toy_workdir).check(found)
    sites = scores.to_pandas()
    assert list(sites.columns)[:len(site_scores.CSV_COLUMNS)] == list(site_scores.CSV_COLUMNS)
    assert sites["p_given"].dtype == np.float64 and sites["p_predicted"].dtype == np.float64
    assert sites["multiplicity"].dtype.kind == "i"
    zn = sites[sites.given_element == "Zn"]
    assert len(zn) == 1 and np.isnan(zn["p_given"].iloc[0])
    assert len(sites[sites.p_given < 2]) == 6  # a comparison, not a TypeError
    per_structure = scores.to_pandas(per="structure")
    assert len(per_structure) == 1 and per_structure["plausibility"].dtype == np.float64
    assert per_structure["num_atoms"].iloc[0] == 7


# 3. Nothing scored (or featurised) is a failure, with one line and no empty output.
