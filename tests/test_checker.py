"""The structure checker: calibration, the model's domain, flags, swaps, and textbook
inorganic crystals the shipped checker must not call implausible."""

from __future__ import annotations

import csv
import io
import shutil

import numpy as np
import pytest

import cryknn
from cryknn import calibration, checking, cif, input_pipeline, saved_model, scoring
from tests.conftest import METHANE_CIF


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 5))
    p = calibration.apply_temperature(logits, 2.0)
    labels = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.08)
    # probabilities give the same fit as their logits
    probs = calibration.apply_temperature(logits, 1.0)
    assert calibration.fit_temperature(probs, labels) == pytest.approx(
        calibration.fit_temperature(logits, labels), rel=1e-3)
    before = calibration.expected_calibration_error(probs, labels)
    after = calibration.expected_calibration_error(calibration.apply_temperature(probs, 2.0),
                                                   labels)
    assert after < 0.02 < before
    np.testing.assert_allclose(calibration.apply_temperature(probs, 1.0), probs, atol=1e-6)


def test_reliability_diagram_is_written(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), 500)
    labels = rng.integers(0, 4, 500)
    out = tmp_path / "rel.png"
    calibration.plot_reliability({"a": (probs, labels)}, str(out), "t")
    assert out.stat().st_size > 1000


def test_domain_reference_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    train, validation = rng.normal(size=(2000, 4)), rng.normal(size=(500, 4))
    ref = calibration.DomainReference.fit(train, validation, quantile=0.99)
    assert np.mean(ref.score(validation) > ref.cutoff) == pytest.approx(0.01, abs=0.004)
    assert ref.score(np.full((1, 4), 10.0))[0] > ref.cutoff
    ref.save(str(tmp_path / "d.npz"))
    back = calibration.DomainReference.load(str(tmp_path / "d.npz"))
    assert back.cutoff == pytest.approx(ref.cutoff)
    np.testing.assert_allclose(back.score(validation[:20]), ref.score(validation[:20]),
                               atol=2e-3)


def _tiny_table():
    """Two structures: a C-C-O chain of three atoms (sites 0, 0, 1) and an N-H pair."""
    nbr = np.array([[1, 2], [0, 2], [1, 0], [4, 4], [3, 3]])
    return input_pipeline.AtomTable(
        distances=np.ones((5, 2), np.float32), neighbour_index=nbr.astype(np.int32),
        atomic_number=np.array([6, 6, 8, 7, 1], np.int32),
        structure_index=np.array([0, 0, 0, 1, 1], np.int32),
        site_label=np.array([b"C1", b"C1", b"O1", b"N1", b"H1"]),
        structure_id=np.array(["a:a", "b:b"]), site=np.array([0, 0, 1, 2, 3]))


def test_swaps_change_whole_sites_to_neighbours_in_z():
    table = _tiny_table()
    swaps = checking.pick_swaps(table, [1, 6, 7, 8, 9], seed=0)
    assert swaps.structure.tolist() == [0, 1]
    z = swaps.table.atomic_number
    changed = z != table.atomic_number
    assert changed[3] and z[3] in (6, 8)  # N -> C or O; H is never swapped
    assert changed[0] == changed[1] and (changed[0] or changed[2])  # a whole site
    assert changed[0] or z[2] in (7, 9)
    assert checking.partners([6, 7])[6] == [7] and 8 not in checking.partners([6, 7])
    only = np.zeros(5, bool)
    only[2] = True
    assert checking.affected_rows(table, only, 0).tolist() == [2]
    assert checking.affected_rows(table, only, 1).tolist() == [0, 1, 2]


def test_uncalibrated_model_loads_with_temperature_one_and_flags(toy_workdir, tmp_path):
    model = cryknn.load_model(toy_workdir)
    assert model.temperature == 1.0 and model.domain is None
    assert model.threshold == scoring.DEFAULT_THRESHOLD
    (s,), _ = cif.read_cif_text(METHANE_CIF, "methane")
    (score,) = model.check(s, threshold=1.01)
    flags = {t.site_label: t.flag for t in score.sites}
    assert flags.pop("Zn1") == "outside_domain"  # Zn: not a modelled element
    assert set(flags.values()) == {"implausible"}
    out = tmp_path / "sites.csv"
    scoring.write_csv(str(out), [score])
    rows = list(csv.DictReader(open(out)))
    assert [r["flag"] for r in rows].count("implausible") == 6
    assert list(rows[0])[-1] == "flag"


def test_calibrate_saved_model_adds_and_reload_uses_it(toy_workdir, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(f"{toy_workdir}/model", folder)
    added = checking.calibrate_saved_model(folder, log=lambda m: None)
    T = added["calibration"]["temperature"]
    assert 0.05 <= T <= 20 and added["checking"]["chosen_on"] == "validation"
    saved = saved_model.load(folder)
    assert saved.info["calibration"]["temperature"] == T
    model = scoring.Model(saved, "calibrated")
    assert model.temperature == T and model.domain is not None
    assert model.threshold == added["checking"]["threshold"]
    # refitting replaces, and the model still scores
    checking.calibrate_saved_model(folder, log=lambda m: None)
    (s,), _ = cif.read_cif_text(METHANE_CIF, "methane")
    (score,) = scoring.Model(saved_model.load(folder), "again").check(s)
    assert {t.flag for t in score.sites} <= set(scoring.FLAGS)


# Textbook inorganic crystals: nothing like a MOF; the checker must not call them wrong.
def _textbook():
    ase_build = pytest.importorskip("ase.build")
    from ase.spacegroup import crystal

    return {
        "NaCl": ase_build.bulk("NaCl", "rocksalt", a=5.64),
        "MgO": ase_build.bulk("MgO", "rocksalt", a=4.21),
        "diamond": ase_build.bulk("C", "diamond", a=3.567),
        "Cu": ase_build.bulk("Cu", "fcc", a=3.615),
        "Fe": ase_build.bulk("Fe", "bcc", a=2.867),
        "ZnS": ase_build.bulk("ZnS", "zincblende", a=5.41),
        "ZnO": ase_build.bulk("ZnO", "wurtzite", a=3.25, c=5.207),
        "CaF2": ase_build.bulk("CaF2", "fluorite", a=5.463),
        # alpha-quartz, P3_221 (Levien, Prewitt & Weidner, Am. Mineral. 65, 920 (1980))
        "quartz": crystal(["Si", "O"], basis=[(0.4697, 0, 0), (0.4135, 0.2669, 0.1191)],
                          spacegroup=154, cellpar=[4.916, 4.916, 5.405, 90, 90, 120]),
        # rutile TiO2, P4_2/mnm
        "rutile": crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)],
                          spacegroup=136, cellpar=[4.594, 4.594, 2.959, 90, 90, 90]),
    }


def test_textbook_crystals_get_no_implausible_site_from_the_default_checker():
    crystals = _textbook()
    name = scoring.checking_default()
    model = cryknn.load_model(name=name)
    scores = model.check(list(crystals.values()))
    for (label, _), score in zip(crystals.items(), scores):
        bad = [(t.site_label, t.given, round(t.p_given, 4)) for t in score.implausible()]
        assert not bad, f"{label}: implausible sites {bad} from the shipped model {name!r}"
    nacl = scores[0]
    assert nacl.mostly_outside_domain  # Na is not modelled; Cl in rock salt is no MOF's Cl
    text = scoring.format_structure(nacl, model.threshold)
    assert text.count("OUTSIDE DOMAIN") == 1


def test_predict_names_the_checking_model_and_threshold(tmp_path):
    from cryknn import predict

    cif = tmp_path / "methane.cif"
    cif.write_text(METHANE_CIF)
    out, err = io.StringIO(), io.StringIO()
    assert predict.run_predict([str(cif)], None, None, None, None, stdout=out, stderr=err) == 0
    text = out.getvalue()
    name = scoring.checking_default()
    assert f"shipped model {name!r}" in text
    assert f"checking at p(given) < {cryknn.load_model(name=name).threshold:.3g}" in text
