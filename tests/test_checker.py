"""The structure checker: calibration, the model's domain, flags, swaps, and textbook
inorganic crystals the shipped checker must not call implausible."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil

import pytest

import cryknn
from cryknn import (checking, cif, errors, extras, member_forward, saved_model, scoring,
                    site_scores)
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


# The adjacent-Z test: a site whose element is far less likely than its neighbour in Z.

def test_p_vs_adjacent_compares_the_given_element_with_its_likeliest_neighbour_in_z():
    import numpy as np

    numbers = [6, 7, 8, 30]  # C, N, O, Zn: C-N and N-O are adjacent, Zn has no partner here
    probs = np.array([[0.10, 0.80, 0.05, 0.05],   # C given, N likely: a swapped carbon
                      [0.10, 0.00, 0.85, 0.05],   # C given, O likely: O is no neighbour of C
                      [0.02, 0.30, 0.60, 0.08],   # N given: its best neighbour is O
                      [0.25, 0.25, 0.25, 0.25]])  # Zn given: no modelled neighbour
    ratio = scoring.p_vs_adjacent(probs, np.array([6, 6, 7, 30]), numbers)
    np.testing.assert_allclose(ratio[:3], [0.1 / 0.9, 1.0, 0.3 / 0.9])
    assert np.isnan(ratio[3])
    assert np.isnan(scoring.p_vs_adjacent(probs[:1], np.array([1]), numbers)[0])  # H
    rule = scoring.CheckRule(threshold=0.05, adjacent_threshold=0.2)
    p_given = probs[np.arange(4), [0, 0, 1, 3]]
    assert (rule.score(p_given, ratio) < 1).tolist() == [True, False, False, False]
    assert (scoring.CheckRule(0.05).score(p_given, ratio) < 1).tolist() == [False] * 4
    assert (scoring.CheckRule(0.2, 0.2).score(p_given, ratio) < 1).tolist() == [
        True, True, False, False]


def test_the_rule_flags_by_either_test_and_reaches_every_output(tmp_path):
    """A site is implausible by p(given) or by its neighbour in Z; the flags, not a
    threshold, decide what the terminal, the CSV and the flagged CIF mark."""
    import numpy as np

    model = cryknn.load_model(name="default")  # 20 elements: C has N beside it
    name, data = next(cif.iter_tar_cifs(cif.core_mof_archive("2019-ASR"), 1))
    (s,), _ = cif.read_cif_text(data.decode(), name)  # a real MOF: sites in the domain
    (plain,) = model.check(s, threshold=1e-9)
    ratios = [t.p_vs_adjacent for t in plain.sites]
    assert not plain.implausible() and any(r is not None for r in ratios)
    cut = max(r for r in ratios if r is not None) + 1e-6
    (score,) = model.check(s, threshold=1e-9, adjacent_threshold=cut)
    flagged = {t.site_label for t in score.implausible()}
    assert flagged and flagged == {t.site_label for t in plain.sites if t.p_vs_adjacent
                                   is not None and t.flag != "outside_domain"}
    assert not score.implausible(1e-9)  # an explicit threshold asks about p(given) only
    text = site_scores.format_structure(score)
    assert text.count("IMPLAUSIBLE") == len(flagged)
    site_scores.write_csv(str(tmp_path / "s.csv"), [score])
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert {r["site_label"] for r in rows if r["flag"] == "implausible"} == flagged
    assert {r["p_vs_adjacent"] == "" for r in rows} == {True, False}
    assert site_scores.write_flagged_cif(str(tmp_path / "f.cif"), [s], [score]) == 1
    assert "implausible" in (tmp_path / "f.cif").read_text()
    if extras.installed("pandas"):  # the test extra has it; the rest holds without
        frame = site_scores.Scores([score]).to_pandas()
        assert frame.p_vs_adjacent.dtype == float and frame.p_vs_adjacent.isna().any()
        np.testing.assert_array_less(frame.p_vs_adjacent.dropna(), cut)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_bad_adjacent_threshold_is_refused_before_any_work(value, tmp_path):
    from cryknn.cli import predict

    cif_path = tmp_path / "methane.cif"
    cif_path.write_text(METHANE_CIF)
    with pytest.raises(errors.ConfigError, match="--adjacent_threshold must be in"):
        predict.run_predict([str(cif_path)], None, None, None, None,
                            adjacent_threshold=value)


def test_choose_rule_keeps_the_floor_and_meets_the_target_on_the_run():
    """On a synthetic run (real structures' site scores random, swapped sites far less
    likely than their neighbour), the floor alone flags at most 1 % and the rule at most
    5 % of the real structures, and the adjacent test catches what p(given) misses."""
    import numpy as np

    rng = np.random.default_rng(0)
    structures, per = 400, 5
    sites = structures * per
    site_p = rng.uniform(0.001, 1, sites)
    site_ratio = rng.uniform(0.05, 1, sites)
    swapped_site = np.arange(structures) * per
    swapped_p, swapped_ratio = site_p.copy(), site_ratio.copy()
    swapped_p[swapped_site] = 0.3  # p(given) says little...
    swapped_ratio[swapped_site] = 0.01  # ...the neighbour in Z is far likelier
    numbers = np.full(sites, 6)
    run = checking.CheckRun(site_p, numbers, swapped_p, numbers, np.ones(sites, bool),
                            np.ones(sites, bool), np.repeat(np.arange(structures), per),
                            swapped_site, np.arange(structures), site_ratio, swapped_ratio)
    rule = checking.choose_rule(run)
    assert np.mean(run.structure_min(rule.threshold) < 1) <= checking.FLOOR_STRUCTURES
    rates = run.rates(rule)
    assert rates["real_structures_flagged"] <= checking.TARGET_STRUCTURE_FALSE_ALARMS
    assert rates["swap_detection"] == 1.0
    assert run.rates(checking.choose_threshold(run))["swap_detection"] < 0.5
    assert rates["adjacent_threshold"] == rule.adjacent_threshold


def test_choose_rule_with_a_detection_target_leaves_equal_room_to_both_targets():
    """Where swaps overlap the real sites, fitting to 5 % flagged spends all the room on
    detection; with a detection target the rule takes the point whose smaller margin is
    largest (checked against every threshold), flagging fewer real structures while
    still catching at least 90 %."""
    import numpy as np

    rng = np.random.default_rng(1)
    structures, per = 2000, 4
    sites = structures * per
    site_ratio = rng.uniform(0.02, 1, sites)
    swapped_site = np.arange(structures) * per
    swapped_ratio = site_ratio.copy()
    swapped_ratio[swapped_site] = rng.uniform(0.0, 0.05, structures) ** 1.5
    site_p = np.ones(sites)  # the floor flags nothing: only the ratio decides
    numbers = np.full(sites, 6)
    run = checking.CheckRun(site_p, numbers, site_p, numbers, np.ones(sites, bool),
                            np.ones(sites, bool), np.repeat(np.arange(structures), per),
                            swapped_site, np.arange(structures), site_ratio, swapped_ratio)
    at_target = run.rates(checking.choose_rule(run))
    balanced = run.rates(checking.choose_rule(run, detection_target=0.9))
    margin = lambda r: min(0.05 - r["real_structures_flagged"],  # noqa: E731
                           r["swap_detection"] - 0.9)
    assert at_target["real_structures_flagged"] > 0.045
    assert balanced["real_structures_flagged"] < at_target["real_structures_flagged"] - 0.01
    assert balanced["swap_detection"] >= 0.9
    best = max(margin(run.rates(checking.choose_rule(run, thresholds=np.array([a]))))
               for a in checking.THRESHOLDS[::7])
    assert margin(balanced) >= best - 1e-12 and margin(balanced) > margin(at_target)
    # A model that cannot meet both (swaps hidden among the real sites) keeps the
    # false-alarm target rather than trading it for detection it cannot reach.
    hidden = dataclasses.replace(run, swapped_ratio=np.where(
        np.isin(np.arange(sites), swapped_site), rng.uniform(0.02, 1, sites), site_ratio))
    kept = checking.choose_rule(hidden, detection_target=0.9)
    assert kept == checking.choose_rule(hidden)
    assert checking.operating_point(balanced) == "equal margins"
    assert checking.operating_point(hidden.rates(kept)).startswith("at most 5% flagged")


def test_least_parts_and_subset_agree_with_the_site_scores():
    """A structure is flagged under any rule exactly when its least p(given) or least
    p_vs_adjacent (over checkable sites) is below the rule's threshold: what choose_rule
    fits with. And a run restricted to some structures rates them as the whole run does."""
    import numpy as np

    rng = np.random.default_rng(2)
    structures = 300
    per = rng.integers(1, 7, structures)
    site_structure = np.repeat(np.arange(structures), per)
    sites = len(site_structure)
    first = np.r_[0, np.cumsum(per)[:-1]]
    swapped_site = first + rng.integers(0, per)
    ratio = np.where(rng.random(sites) < 0.2, np.nan, rng.uniform(0, 1, sites))
    run = checking.CheckRun(
        rng.uniform(0, 1, sites) ** 3, np.full(sites, 6), rng.uniform(0, 1, sites) ** 3,
        np.full(sites, 7), rng.random(sites) < 0.9, np.ones(sites, bool), site_structure,
        swapped_site, np.arange(structures), ratio, rng.uniform(0, 1, sites))
    for rule in (scoring.CheckRule(0.01, 0.1), scoring.CheckRule(0.2), 0.05):
        rule = checking.as_rule(rule)
        adjacent = rule.adjacent_threshold or 0.0
        for swapped, least in ((False, run.structure_min(rule)),
                               (True, run.swapped_min(rule))):
            p, r = run.least_parts(swapped)
            assert np.array_equal(least < 1, (p < rule.threshold) | (r < adjacent))
    keep = rng.random(structures) < 0.4
    part = run.subset(keep)
    rule = scoring.CheckRule(0.01, 0.1)
    assert part.structures == keep.sum() == len(part.swapped_site)
    assert part.rates(rule)["real_structures_flagged"] == np.mean(
        run.structure_min(rule)[keep] < 1)
    assert part.rates(rule)["swap_detection"] == np.mean(run.swapped_min(rule)[keep] < 1)


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


def test_an_ensemble_may_mix_architectures_of_one_mode(tmp_path):
    """A tree member (inputs gathered on the host) and a graph member (whole structures)
    of the same elements, k and mode average as each predicts alone; the ensemble's
    receptive field is the wider one. A geometry-only member is refused."""
    import numpy as np

    from cryknn import features

    tree = os.path.join(scoring.PRETRAINED, "masked_ensemble", "members", "0")
    graph = os.path.join(scoring.PRETRAINED, "masked")
    folder = str(tmp_path / "mixed")
    saved_model.save_ensemble(folder, [tree, graph])
    mixed = scoring.Model(saved_model.load(folder), "mixed")
    assert {m.spec.reads for m in mixed._forward} == {"tree", "graph"}
    assert "1 tree and 1 graph models" in mixed.describe()
    assert mixed.spec.receptive_hops == max(m.spec.receptive_hops for m in mixed._forward)
    (s,), _ = cif.read_cif_text(METHANE_CIF, "methane")
    table = features.atom_table([s], mixed.k)
    rows = np.arange(len(table))
    alone = [member_forward.predict(model._forward[0], table, rows, len(model.elements))
             for model in (scoring.Model(saved_model.load(m), m) for m in (tree, graph))]
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    np.testing.assert_allclose(mixed.predict_table(table), np.mean(alone, axis=0),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(errors.ModelError, match="same mode"):
        saved_model.save_ensemble(str(tmp_path / "modes"),
                                  [graph, os.path.join(scoring.PRETRAINED, "default")])


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
