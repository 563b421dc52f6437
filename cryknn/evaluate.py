"""Metrics and reports: confusion matrix, per-element P/R/F1, figures, misclassified sites.

Metrics are computed from a confusion matrix plus a top-3 hit count, so the per-process
parts of a multi-host evaluation simply add up (`split_metrics`, `monitor_metrics`).
"""

from __future__ import annotations

import csv
from typing import Sequence

import numpy as np

from cryknn import parallel
from cryknn import util


def confusion_counts(y_true: np.ndarray, probs: np.ndarray, num_classes: int,
                     top: int = 3) -> tuple[np.ndarray, int]:
    """((C, C) int64 confusion matrix [true, predicted], number of atoms with the true class
    among the `top` most probable). y_true: (A,) int, probs: (A, C)."""
    y_true = np.asarray(y_true)
    pred = np.argmax(probs, axis=-1)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, pred), 1)
    top = min(top, num_classes)
    top_idx = np.argpartition(-probs, top - 1, axis=-1)[:, :top]
    hits = int(np.sum(np.any(top_idx == y_true[:, None], axis=-1)))
    return cm, hits


def metrics_from_confusion(cm: np.ndarray, top3_hits: int, symbols: Sequence[str],
                           most_confused: int = 10) -> dict:
    """Accuracy, balanced accuracy (mean recall over classes present), top-3 accuracy,
    per-element precision/recall/F1/support and the most confused (true, predicted) pairs."""
    cm = np.asarray(cm, np.int64)
    total = int(cm.sum())
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(tp)), where=denom > 0)
    present = support > 0
    return {
        "num_atoms": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "top3_accuracy": float(top3_hits / total) if total else 0.0,
        "per_element": {
            s: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, s in enumerate(symbols)
        },
        "most_confused": most_confused_pairs(cm, symbols, most_confused),
        "confusion_matrix": {"elements": list(symbols), "counts": cm.tolist(),
                             "rows": "true element", "columns": "predicted element"},
    }


def split_metrics(probs: np.ndarray, labels: np.ndarray, symbols: Sequence[str]
                  ) -> tuple[dict, np.ndarray]:
    """Metrics over every process's atoms of a split, and its (C, C) confusion matrix.

    probs: (A, C) this process's probabilities; labels: (A,) int class indices.
    """
    num_classes = len(symbols)
    cm, hits = confusion_counts(labels, probs, num_classes)
    p_true = probs[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)
    nll = parallel.global_sum(np.array([-np.log(np.maximum(p_true, 1e-12)).sum()]))[0]
    cm, hits = parallel.global_sum(cm), int(parallel.global_sum(np.array([hits]))[0])
    metrics = metrics_from_confusion(cm, hits, symbols)
    metrics["loss"] = float(nll / max(cm.sum(), 1))  # unweighted cross-entropy
    return metrics, cm


def monitor_metrics(probs: np.ndarray, labels: np.ndarray, support: np.ndarray) -> dict:
    """Loss, accuracy and balanced accuracy of a full split, estimated from a per-class
    capped subset of it: per-class recall and cross-entropy are re-weighted by the full
    split's class counts `support` (C,), so the estimates are unbiased for the full split.

    probs: (A, C) this process's probabilities of the subset; labels: (A,) class indices.
    """
    num_classes = len(support)
    cm, _ = confusion_counts(labels, probs, num_classes)
    p_true = probs[np.arange(len(labels)), labels]
    nll = np.bincount(labels, weights=-np.log(np.maximum(p_true, 1e-12)), minlength=num_classes)
    cm, nll = parallel.global_sum(cm), parallel.global_sum(nll)
    n = cm.sum(axis=1)
    present = n > 0
    recall = np.divide(np.diag(cm), n, out=np.zeros(num_classes), where=present)
    freq = support / max(support.sum(), 1)
    return {"loss": float(np.sum(freq * np.divide(nll, n, out=np.zeros(num_classes),
                                                   where=present))),
            "accuracy": float(np.sum(freq * recall)),
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0}


# ----------------------------------------------------------------------------
# Family-bootstrap intervals: resample whole near-copy groups, since atoms of one structure
# (and structures of one group) are not independent.

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def group_codes(groups: Sequence[str]) -> np.ndarray:
    """(A,) int64 code of each atom's group name, codes 0..G-1 in sorted-name order."""
    return np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1].reshape(-1)


def bootstrap_weights(num_groups: int, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> np.ndarray:
    """(R, G) int64 how often each group is drawn in each resample (G draws with
    replacement). The same (G, R, seed) give the same draws: models compared on the same
    atoms share their resamples (a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=resamples)


def resampled_confusions(labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray,
                         num_classes: int, weights: np.ndarray) -> np.ndarray:
    """(R, C, C) confusion matrices of the resamples: labels, predicted (A,) class indices,
    groups (A,) codes 0..G-1, weights (R, G) from `bootstrap_weights`."""
    num_groups = weights.shape[1]
    cells = (np.asarray(groups, np.int64) * num_classes + labels) * num_classes + predicted
    per_group = np.bincount(cells, minlength=num_groups * num_classes * num_classes)
    per_group = per_group.reshape(num_groups, num_classes * num_classes).astype(np.float64)
    return (weights.astype(np.float64) @ per_group).reshape(-1, num_classes, num_classes)


def accuracies(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and balanced accuracy (mean recall over the classes present) of each (C, C)
    confusion matrix in (R, C, C)."""
    support = cms.sum(axis=2)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    return {"accuracy": tp.sum(axis=1) / np.maximum(cms.sum(axis=(1, 2)), 1),
            "balanced_accuracy": recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)}


def interval(values: np.ndarray, level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """[low, high] percentile interval of bootstrap values."""
    tail = (1.0 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def share_interval(hits: np.ndarray, groups: Sequence[str],
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """95 % family-bootstrap interval of the share of True in hits (N,) bool (structures
    flagged, swaps caught), groups (N,) each item's near-copy group; None when empty."""
    hits = np.asarray(hits, bool)
    if hits.size == 0:
        return None
    codes = group_codes(groups)
    weights = bootstrap_weights(int(codes.max()) + 1, resamples, seed).astype(np.float64)
    found = weights @ np.bincount(codes, hits, minlength=weights.shape[1])
    total = weights @ np.bincount(codes, minlength=weights.shape[1]).astype(np.float64)
    return interval(found / np.maximum(total, 1))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, groups: Sequence[str],
                        num_classes: int, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> dict:
    """95 % family-bootstrap intervals of accuracy and balanced accuracy.

    labels (A,), probs (A, C), groups (A,) the near-copy group (or family) of each atom's
    structure: the groups are resampled with replacement, `resamples` times.
    """
    codes = group_codes(groups)
    num_groups = int(codes.max()) + 1 if codes.size else 0
    if num_groups == 0:
        return {}
    weights = bootstrap_weights(num_groups, resamples, seed)
    values = accuracies(resampled_confusions(np.asarray(labels), np.argmax(probs, axis=-1),
                                             codes, num_classes, weights))
    return {"level": BOOTSTRAP_LEVEL, "resamples": resamples, "groups": num_groups,
            "unit": "near-copy group of families",
            **{name: interval(v) for name, v in values.items()}}


def most_confused_pairs(cm: np.ndarray, symbols: Sequence[str], n: int) -> list[dict]:
    """The n largest off-diagonal cells: true, predicted, count, fraction of the true row."""
    off = np.asarray(cm).copy()
    np.fill_diagonal(off, 0)
    support = np.asarray(cm).sum(axis=1)
    pairs = []
    for flat in np.argsort(-off, axis=None, kind="stable")[:n]:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": symbols[t], "predicted": symbols[p], "count": int(off[t, p]),
                      "fraction_of_true": float(off[t, p] / support[t])})
    return pairs


def majority_baseline(train_counts: np.ndarray, cm: np.ndarray) -> dict:
    """Metrics of always predicting the most common training class (top-3: the three most
    common), on the split whose confusion matrix is `cm` (only its row sums are used)."""
    train_counts = np.asarray(train_counts)
    support = np.asarray(cm).sum(axis=1)
    total = int(support.sum())
    order = np.argsort(-train_counts, kind="stable")
    majority = int(order[0])
    present = support > 0
    recall = np.zeros(len(support))
    recall[majority] = 1.0
    return {
        "predicted_class_index": majority,
        "accuracy": float(support[majority] / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "top3_accuracy": float(support[order[:3]].sum() / total) if total else 0.0,
    }


def plot_confusion(cm: np.ndarray, symbols: Sequence[str], path: str, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true element, columns: predicted) as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(symbols)
    size = max(5.0, 0.38 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), symbols, rotation=90 if n > 30 else 0)
    ax.set_yticks(range(n), symbols)
    ax.set_xlabel("predicted element")
    ax.set_ylabel("true element")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}".lstrip("0"), ha="center", va="center",
                            fontsize=6, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised: recall on the diagonal)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with util.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_curves(history: Sequence[dict], path: str) -> None:
    """Training loss/accuracy and validation accuracy/balanced accuracy per epoch, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-",
             label="train (class-weighted, selected atoms)")
    if history and "validation_loss" in history[0]:
        ax1.plot(epochs, [h["validation_loss"] for h in history], "o-",
                 label="validation (unweighted, all atoms)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    for key, label in (("train_accuracy", "train accuracy (selected atoms)"),
                       ("validation_accuracy", "validation accuracy"),
                       ("validation_balanced_accuracy", "validation balanced accuracy")):
        if history and key in history[0]:
            ax2.plot(epochs, [h[key] for h in history], "o-", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    with util.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_misclassifications(path: str, structure_ids: np.ndarray, site_labels: np.ndarray,
                             y_true: np.ndarray, probs: np.ndarray,
                             symbols: Sequence[str]) -> int:
    """CSV of every wrongly predicted atom: structure_id, site_label, true_element,
    predicted_element, probability (of the predicted element). Returns the row count."""
    pred = np.argmax(probs, axis=-1)
    wrong = np.flatnonzero(pred != y_true)
    with util.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["structure_id", "site_label", "true_element", "predicted_element",
                    "probability"])
        for i in wrong:
            label = site_labels[i]
            w.writerow([structure_ids[i],
                        label.decode("utf-8") if isinstance(label, bytes) else label,
                        symbols[y_true[i]], symbols[pred[i]], f"{probs[i, pred[i]]:.4f}"])
    return len(wrong)


def write_predictions(path: str, groups: np.ndarray, structure_ids: np.ndarray,
                      site_labels: np.ndarray, y_true: np.ndarray, probs: np.ndarray,
                      symbols: Sequence[str]) -> None:
    """test_predictions.npz: per test atom its group, structure id, site label, true and
    predicted class and p(true); `elements` the class order. Two runs on one dataset build
    list the same atoms in the same order, so they compare atom by atom (paired)."""
    pred = np.argmax(probs, axis=-1)
    with util.atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(
            tmp, group=np.asarray(groups, dtype=str), structure_id=np.asarray(structure_ids,
                                                                               dtype=str),
            site_label=np.asarray(site_labels), label=np.asarray(y_true, np.int16),
            predicted=pred.astype(np.int16),
            p_true=probs[np.arange(len(pred)), y_true].astype(np.float32) if len(pred)
            else np.zeros(0, np.float32),
            elements=np.asarray(symbols, dtype=str))


def paired_difference(a: dict, b: dict, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """Paired family bootstrap of B - A on the same atoms: a, b are loaded
    test_predictions.npz contents (dicts of arrays). Returns per metric A, B, B - A and the
    95 % interval of B - A (same resamples for both), and whether it excludes 0."""
    if not (np.array_equal(a["structure_id"], b["structure_id"])
            and np.array_equal(a["label"], b["label"])):
        raise ValueError("the two runs did not predict the same atoms (another dataset build, "
                         "k or element list?)")
    codes = group_codes(a["group"])
    num_groups = int(codes.max()) + 1
    labels = a["label"].astype(np.int64)

    def values(run: dict, weights: np.ndarray) -> dict[str, np.ndarray]:
        return accuracies(resampled_confusions(labels, run["predicted"].astype(np.int64),
                                               codes, len(a["elements"]), weights))

    once = np.ones((1, num_groups), np.int64)  # every group once: the point estimate
    draws = bootstrap_weights(num_groups, resamples, seed)
    point_a, point_b, boot_a, boot_b = (values(a, once), values(b, once), values(a, draws),
                                        values(b, draws))
    out = {}
    for name in ("accuracy", "balanced_accuracy"):
        low, high = interval(boot_b[name] - boot_a[name])
        out[name] = {"a": float(point_a[name][0]), "b": float(point_b[name][0]),
                     "difference": float(point_b[name][0] - point_a[name][0]),
                     "interval": [low, high], "excludes_zero": bool(low > 0 or high < 0)}
    return out
