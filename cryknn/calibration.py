"""Calibrated probabilities and the model's domain, fitted after training, kept with the model.

  T = fit_temperature(probs, labels)          # temperature scaling (Guo et al. 2017)
  apply_temperature(probs, T)                 # softmax(log p / T) = softmax(logits / T)
  expected_calibration_error(probs, labels)   # top-label ECE, equal-width bins
  plot_reliability({'test': (probs, labels)}, 'reliability.png')
  env = features(t.distances, t.neighbour_index, t.atomic_number, k)  # (A, 2k + 1)
  reference = DomainReference.fit(train_env, validation_env)
  reference.score(env)                        # (A,) distance to the nearest training atom

Temperature scaling divides the logits by one number T fitted to minimise the negative
log-likelihood on the validation split (C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On
calibration of modern neural networks", ICML 2017): the predicted class never changes,
only how sure the model says it is. The saved model's model.json keeps
`calibration: {"temperature": T, "fitted_on": "validation", ...}`; a model without it has
T = 1.

The domain: an atom's environment is described by the logarithms of its k nearest-neighbour
distances, the mean of each neighbour's own k log distances, and the share of metals among
its k neighbours (2k + 1 numbers, standardised; no swap of `cryknn.checking.SWAP_PAIRS`
changes them, since each pair is two non-metals or two metals).
Its domain score is the Euclidean distance to the nearest of a random sample of training
atoms (`domain.npz` beside model.json); atoms scoring above the cutoff (a high quantile of
the validation atoms' scores) have an environment unlike anything in training. The whole
module is numpy and scipy (fitting only): scoring imports it; fitting it on a dataset is in
`cryknn.checking`.
"""

from __future__ import annotations

import os

import numpy as np

from cryknn import errors
from cryknn import util

KEY = "calibration"
DOMAIN_FILE = "domain.npz"
DOMAIN_FEATURE = ("log k-NN distances, the neighbours' mean log k-NN distances, the share "
                  "of metals among the k neighbours")
# Non-metals (metalloids B, Si, Ge, As, Sb, Te counted with them); every other element is a
# metal for the domain's features.
NON_METALS = frozenset((1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 32, 33, 34, 35, 36, 51,
                        52, 53, 54, 85, 86))
_METAL = np.array([z > 0 and z not in NON_METALS for z in range(119)])
TINY = 1e-12


# ----------------------------------------------------------------------------
# Temperature scaling.


def _log_probs(logits_or_probs: np.ndarray) -> np.ndarray:
    """(N, C) log-probabilities (up to a per-row constant) of logits or probabilities."""
    x = np.asarray(logits_or_probs, np.float64)
    is_probs = x.min() >= 0 and np.allclose(x.sum(axis=1), 1, atol=1e-3)
    return np.log(np.maximum(x, TINY)) if is_probs else x


def apply_temperature(logits_or_probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities softmax(z / T) of logits z (or of log p for probabilities)."""
    z = _log_probs(logits_or_probs) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(logits_or_probs: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean -log p(label) after temperature scaling."""
    z = _log_probs(logits_or_probs) / float(temperature)
    top = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits_or_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the negative log-likelihood of `labels`
    (N,) under softmax(z / T); z: (N, C) logits, or probabilities (their logarithms)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        raise errors.DataError("cannot fit a temperature on no atoms")
    z = _log_probs(logits_or_probs)
    found = minimize_scalar(lambda log_t: negative_log_likelihood(z, labels, np.exp(log_t)),
                            bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Top-label reliability in `bins` equal-width confidence bins: per bin the mean
    confidence, the accuracy and the number of atoms (empty bins: NaN, 0)."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, confidence, bins) / count
        acc = np.bincount(which, correct, bins) / count
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (bin share) x |accuracy -
    mean confidence| (M. P. Naeini, G. Cooper, M. Hauskrecht, AAAI 2015)."""
    curve = reliability_curve(probs, labels, bins)
    count = np.asarray(curve["count"], np.float64)
    gap = np.abs(np.nan_to_num(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"])))
    return float((count * gap).sum() / max(count.sum(), 1))


def plot_reliability(curves: dict, path: str, title: str = "", bins: int = 15) -> None:
    """Reliability diagram: one line per name of curves {name: (probs (N, C), labels (N,))},
    accuracy against confidence, with each curve's ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for name, (probs, labels) in curves.items():
        curve = reliability_curve(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        ax.plot(curve["confidence"], curve["accuracy"], marker="o", ms=3,
                label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with util.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The domain: how unlike training an atom's environment is.


def features(distances: np.ndarray, neighbour_index: np.ndarray, atomic_number: np.ndarray,
             k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(R, 2k + 1) float32 environment of the atoms at `rows` (default all) of a k-NN table:
    log of its k distances, the mean log distance of each of its k neighbours, the share of
    metals among its k neighbours. distances: (A, K >= k) ascending; neighbour_index:
    (A, K) rows of the same table; atomic_number: (A,)."""
    rows = np.arange(len(distances)) if rows is None else np.asarray(rows)
    log_d = np.log(np.maximum(np.asarray(distances[:, :k], np.float64), 1e-3))
    neighbours = np.asarray(neighbour_index)[rows, :k]
    own = log_d[rows]
    around = log_d[neighbours].mean(axis=2)
    metals = _METAL[np.asarray(atomic_number)[neighbours]].mean(axis=1, keepdims=True)
    return np.concatenate([own, around, metals], axis=1).astype(np.float32)


def nearest_distances(reference: np.ndarray, queries: np.ndarray,
                      chunk: int = 256) -> np.ndarray:
    """(Q,) float64 Euclidean distance of each (Q, F) query to its nearest (R, F) reference
    point, by brute force: the nearest found with one matmul per chunk of queries, its
    distance then recomputed from the difference (no cancellation): a k-d tree's answer up
    to float64 rounding, fast enough for a sample of ~20k points, and without importing
    scipy.spatial (0.1 s of `cryknn predict`'s start-up)."""
    reference = np.asarray(reference, np.float64)
    queries = np.asarray(queries, np.float64)
    out = np.zeros(len(queries), np.float64)
    if len(reference) == 0:
        out[:] = np.inf
        return out
    norms = np.einsum("rf,rf->r", reference, reference)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        nearest = np.argmin(norms[None, :] - 2.0 * (q @ reference.T), axis=1)
        out[start:start + chunk] = np.sqrt(((q - reference[nearest]) ** 2).sum(axis=1))
    return out


class DomainReference:
    """A standardised sample of training environments and the cutoff above which an
    environment is unlike training."""

    def __init__(self, sample: np.ndarray, mean: np.ndarray, std: np.ndarray, cutoff: float):
        self.sample = np.asarray(sample, np.float32)  # (R, F), standardised
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.cutoff = float(cutoff)
        self._sample64 = None  # the sample in float64, made on first use

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray,
            quantile: float = 0.99) -> "DomainReference":
        """From (R, F) training environments and (V, F) validation ones: the cutoff is the
        `quantile` of the validation atoms' scores."""
        mean, std = train.mean(axis=0), np.maximum(train.std(axis=0), 1e-6)
        reference = cls((train - mean) / std, mean, std, np.inf)
        reference.cutoff = float(np.quantile(reference.score(validation), quantile))
        return reference

    def score(self, found: np.ndarray) -> np.ndarray:
        """(A,) distance of each (A, F) environment to its nearest training environment."""
        if len(found) == 0:
            return np.zeros(0, np.float32)
        if self._sample64 is None:
            self._sample64 = self.sample.astype(np.float64)
        queries = (np.asarray(found, np.float32) - self.mean) / self.std
        return nearest_distances(self._sample64, queries).astype(np.float32)

    def save(self, path: str) -> None:
        with util.atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, sample=self.sample.astype(np.float16), mean=self.mean,
                                std=self.std, cutoff=np.float32(self.cutoff))

    @classmethod
    def load(cls, path: str) -> "DomainReference":
        try:
            with np.load(path) as f:
                return cls(f["sample"].astype(np.float32), f["mean"], f["std"],
                           float(f["cutoff"]))
        except (OSError, KeyError, ValueError) as e:
            raise errors.ModelError(f"cannot read {path}: {util.one_line(e, 160)}") from None


def temperature_of(info: dict) -> float:
    """The saved model's temperature (1 when it was never calibrated)."""
    return float((info.get(KEY) or {}).get("temperature", 1.0))


def domain_of(info: dict, folder: str | None) -> DomainReference | None:
    """The saved model's domain reference, or None (not calibrated, or no folder)."""
    domain = (info.get(KEY) or {}).get("domain")
    if not domain or folder is None:
        return None
    path = os.path.join(folder, domain.get("file", DOMAIN_FILE))
    if not os.path.isfile(path):
        raise errors.ModelError(f"{os.path.join(folder, 'model.json')} names the domain "
                                f"reference {path}, which is missing")
    return DomainReference.load(path)
