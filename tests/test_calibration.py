"""Calibration (cryknn.calibration): temperature scaling recovers a known scale, the
reliability diagram is written, the domain reference survives a save and load."""

from __future__ import annotations

import numpy as np
import pytest

from cryknn import calibration


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


def test_nearest_distances_match_a_kd_tree():
    """The domain score's brute-force nearest neighbour against scipy's k-d tree, with
    duplicate reference points, queries on reference points (distance 0), far queries,
    fewer references than one chunk and several chunks."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(4)
    reference = rng.normal(size=(700, 11))
    reference[50] = reference[49]
    queries = np.concatenate([rng.normal(size=(600, 11)), reference[:40],
                              rng.normal(size=(5, 11)) * 50])
    for refs in (reference[:3], reference):
        want = cKDTree(refs).query(queries, k=1)[0]
        got = calibration.nearest_distances(refs, queries, chunk=128)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert calibration.nearest_distances(reference, queries[:0]).shape == (0,)
