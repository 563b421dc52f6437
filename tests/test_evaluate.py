"""Metrics and their family-bootstrap intervals (cryknn.evaluate)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cryknn import evaluate


def _one_hot(pred, num_classes):
    return np.eye(num_classes)[pred]


def _toy_predictions(seed=0, groups=60, per_group=30, num_classes=4, accuracy=0.7):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, groups * per_group)
    right = rng.random(labels.size) < accuracy
    pred = np.where(right, labels, (labels + 1) % num_classes)
    names = np.repeat([f"G{g:03d}" for g in range(groups)], per_group)
    return labels, pred, names


def test_resampling_every_group_once_is_the_confusion_matrix():
    labels, pred, names = _toy_predictions()
    codes = evaluate.group_codes(names)
    once = np.ones((1, codes.max() + 1), np.int64)
    cms = evaluate.resampled_confusions(labels, pred, codes, 4, once)
    cm, _ = evaluate.confusion_counts(labels, _one_hot(pred, 4), 4)
    np.testing.assert_array_equal(cms[0], cm)


def test_intervals_hold_the_point_estimate_and_narrow_with_more_groups():
    labels, pred, names = _toy_predictions()
    got = evaluate.bootstrap_intervals(labels, _one_hot(pred, 4), names, 4)
    cm, hits = evaluate.confusion_counts(labels, _one_hot(pred, 4), 4)
    point = evaluate.metrics_from_confusion(cm, hits, list("ABCD"))
    for name in ("accuracy", "balanced_accuracy"):
        low, high = got[name]
        assert low < point[name] < high
    assert got["groups"] == 60 and got["resamples"] == evaluate.BOOTSTRAP_RESAMPLES
    wide = got["accuracy"][1] - got["accuracy"][0]
    labels, pred, names = _toy_predictions(groups=600)
    many = evaluate.bootstrap_intervals(labels, _one_hot(pred, 4), names, 4)
    assert many["accuracy"][1] - many["accuracy"][0] < wide / 2


def test_atoms_of_one_group_are_resampled_together():
    """All atoms of a group right or all wrong: the interval is as wide as over groups, far
    wider than if the atoms were independent."""
    rng = np.random.default_rng(1)
    right = np.repeat(rng.random(50) < 0.5, 40)
    labels = np.zeros(right.size, np.int64)
    pred = np.where(right, 0, 1)
    names = np.repeat([f"G{g}" for g in range(50)], 40)
    low, high = evaluate.bootstrap_intervals(labels, _one_hot(pred, 2), names, 2)["accuracy"]
    assert high - low > 0.2  # ~ 4 sd of a mean over 50 groups; 2,000 atoms would give ~0.04


def _run(labels, pred, names, symbols="ABCD"):
    return {"group": names, "structure_id": names, "label": labels, "predicted": pred,
            "elements": np.asarray(list(symbols))}


def test_share_intervals_resample_whole_groups():
    """A share of structures (flagged, caught) carried by one group of near-copies is
    uncertain by that whole group: the interval spans what dropping or doubling it gives."""
    hits = np.array([True] * 10 + [False] * 90)
    alone = evaluate.share_interval(hits, [f"s{i}" for i in range(100)])
    grouped = evaluate.share_interval(hits, ["g"] * 10 + [f"s{i}" for i in range(90)])
    assert alone[0] < 0.1 < alone[1] and grouped[0] < 0.1 < grouped[1]
    assert grouped[1] - grouped[0] > alone[1] - alone[0]
    assert grouped[0] == 0.0  # without the one group, nothing is flagged
    assert evaluate.share_interval(np.array([], bool), []) is None


def test_paired_difference():
    labels, pred, names = _toy_predictions()
    same = evaluate.paired_difference(_run(labels, pred, names), _run(labels, pred, names))
    assert same["accuracy"]["difference"] == 0 and same["accuracy"]["interval"] == [0, 0]
    assert not same["accuracy"]["excludes_zero"]
    better = np.where(np.arange(labels.size) % 5 == 0, labels, pred)  # fixes a fifth
    diff = evaluate.paired_difference(_run(labels, pred, names), _run(labels, better, names))
    assert diff["accuracy"]["difference"] > 0 and diff["accuracy"]["excludes_zero"]
    low, high = diff["balanced_accuracy"]["interval"]
    assert 0 < low <= diff["balanced_accuracy"]["difference"] <= high
    with pytest.raises(ValueError, match="same atoms"):
        evaluate.paired_difference(_run(labels, pred, names),
                                   _run(labels[::-1], pred, names))


def test_a_run_writes_intervals_and_predictions(toy_workdir):
    metrics = json.load(open(os.path.join(toy_workdir, "metrics.json")))
    for split in ("test", "validation"):
        intervals = metrics[split]["intervals"]
        for name in ("accuracy", "balanced_accuracy"):
            low, high = intervals[name]
            assert low <= metrics[split][name] <= high
    with np.load(os.path.join(toy_workdir, "test_predictions.npz")) as f:
        assert f["label"].shape == f["predicted"].shape == f["group"].shape
        assert f["label"].size == metrics["test"]["num_atoms"]
        assert np.mean(f["label"] == f["predicted"]) == pytest.approx(
            metrics["test"]["accuracy"])
