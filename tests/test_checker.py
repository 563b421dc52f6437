"""The structure checker: calibration, the model's domain, flags, swaps, and textbook
inorganic crystals the shipped checker must not call implausible."""

from __future__ import annotations

import csv
import io
import shutil

import pytest

import cryknn
from cryknn import checking, cif, errors, saved_model, scoring, site_scores
from tests.conftest import METHANE_CIF


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
    site_scores.write_csv(str(out), [score])
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
    assert {t.flag for t in score.sites} <= set(site_scores.FLAGS)


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
    text = site_scores.format_structure(nacl, model.threshold)
    assert text.count("OUTSIDE DOMAIN") == 1


def test_predict_names_the_checking_model_and_threshold(tmp_path):
    from cryknn.cli import predict

    cif = tmp_path / "methane.cif"
    cif.write_text(METHANE_CIF)
    out, err = io.StringIO(), io.StringIO()
    assert predict.run_predict([str(cif)], None, None, None, None, stdout=out, stderr=err) == 0
    text = out.getvalue()
    name = scoring.checking_default()
    assert f"shipped model {name!r}" in text
    assert f"checking at p(given) < {cryknn.load_model(name=name).threshold:.3g}" in text


def _perturbed_copy(source: str, target: str, scale: float) -> str:
    """A saved model like source with every parameter scaled (another 'seed')."""
    import jax

    saved = saved_model.load(source)
    params = jax.tree_util.tree_map(lambda x: x * scale, saved.params)
    saved_model.save(target, saved.run, params, step=saved.step)
    return target


def test_an_ensemble_averages_its_members_then_scales_by_its_own_temperature(
        toy_workdir, tmp_path):
    import numpy as np

    from cryknn import calibration

    a = f"{toy_workdir}/model"
    b = _perturbed_copy(a, str(tmp_path / "b"), 0.7)
    folder = str(tmp_path / "ensemble")
    saved_model.save_ensemble(folder, [a, b])
    assert saved_model.exists(folder)
    ensemble = scoring.Model(saved_model.load(folder), "ensemble")
    assert ensemble.num_members == 2 and "ensemble of 2" in ensemble.describe()
    (s,), _ = cif.read_cif_text(METHANE_CIF, "methane")
    members = [scoring.Model(saved_model.load(m), m).predict_proba(s) for m in (a, b)]
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(ensemble.predict_proba(s), np.mean(members, axis=0),
                               rtol=1e-5, atol=1e-7)
    added = checking.calibrate_saved_model(folder, log=lambda m: None)
    T = added["calibration"]["temperature"]
    calibrated = scoring.Model(saved_model.load(folder), "calibrated")
    assert calibrated.temperature == T and calibrated.num_members == 2
    np.testing.assert_allclose(calibrated.predict_proba(s), calibration.apply_temperature(
        np.mean(members, axis=0), T), rtol=1e-4, atol=1e-6)
    (score,) = calibrated.check(s)
    assert {t.flag for t in score.sites} <= set(site_scores.FLAGS)


def test_ensembles_refuse_nesting_and_members_outside_their_folder(toy_workdir, tmp_path):
    import json

    a = f"{toy_workdir}/model"
    inner = str(tmp_path / "inner")
    saved_model.save_ensemble(inner, [a, a])
    with pytest.raises(errors.ModelError, match="may not be an ensemble"):
        saved_model.save_ensemble(str(tmp_path / "outer"), [inner, a])
    with pytest.raises(errors.ModelError, match="at least 2"):
        saved_model.save_ensemble(str(tmp_path / "one"), [a])
    info = json.loads((tmp_path / "inner" / "model.json").read_text())
    (tmp_path / "inner" / "model.json").write_text(json.dumps(
        {**info, "members": ["../escape", "members/1"]}))
    with pytest.raises(errors.ModelError, match="member folders inside"):
        saved_model.load(inner)
