"""What checking gives and how it is written (cryknn.site_scores): flagged structures as
extended XYZ and CIF, the terminal block within 100 columns, top-3 alternatives."""

from __future__ import annotations

import pytest

import cryknn
from cryknn import site_scores
from cryknn.cif import as_structure, read_cif_text
from tests.conftest import METHANE_CIF, make_cif


def test_flagged_sites_as_extended_xyz(toy_workdir, tmp_path):
    ase_io = pytest.importorskip("ase.io")
    (s,), _ = read_cif_text(METHANE_CIF, "methane")
    scores = cryknn.load_model(toy_workdir).check([s, s.to_ase()])
    out = str(tmp_path / "flagged.extxyz")
    assert site_scores.write_flagged(out, [s, as_structure(s.to_ase())], scores,
                                     threshold=1.01) == 2
    images = ase_io.read(out, index=":")
    assert len(images) == 2 and len(images[0]) == 7
    flags = list(images[0].arrays["cryknn_flag"])
    assert flags.count("implausible") == 6 and flags.count("not_modelled") == 1
    assert images[0].info["structure_id"] == "methane:methane"


def test_site_top3_and_terminal_block(toy_workdir):
    (s,), _ = read_cif_text(METHANE_CIF, "methane")
    (score,) = cryknn.load_model(toy_workdir).check(s)
    site = score.sites[0]
    probs = [p for _, p in site.top]
    assert probs == sorted(probs, reverse=True)
    assert len(site.top) == 3 and site.top[0][0] == site.predicted
    text = site_scores.format_structure(score, threshold=1.01)
    assert text.count("methane:methane") == 1
    assert all(len(line) <= 100 for line in text.splitlines())


def test_per_atom_lines_and_flags_name_each_atom(toy_workdir, tmp_path):
    rock_salt = make_cif([("C1", "C", 0, 0, 0), ("O1", "O", 0.5, 0.5, 0.5)],
                         cell="5.64 5.64 5.64 90 90 90", block="co",
                         symmetry="_space_group_name_H-M_alt 'F m -3 m'")
    (s,), _ = read_cif_text(rock_salt, "co")
    (score,) = cryknn.load_model(toy_workdir).check(s, per_atom=True)
    text = site_scores.format_structure(score, threshold=0.5)
    assert "C1[0]" in text and "C1[3]" in text and "O1[7]" in text
    out = str(tmp_path / "flagged.cif")
    assert site_scores.write_flagged(out, [s], [score], threshold=1.01) == 1
    (back,) = cryknn.read(out)
    assert back.num_atoms == 8 and sorted(back.numbers.tolist()) == [6] * 4 + [8] * 4
    assert open(out).read().count(" implausible\n") == 8


# 8. The suite: speed-free checks, an sdist with the test helpers, a licence.
