"""The README's model table: finished runs of several models, aggregated over seeds.

    python experiments/headline.py [--workroot=/tmp/cryknn_experiments/default]
        [--models=graph,masked,mlp,two_stage] [--json=F]

Reads <workroot>/<model>_s<seed>/metrics.json (as experiments/reproduce.sh writes them) and
prints, per model, test accuracy, balanced accuracy and top-3 accuracy (mean, standard
deviation and per seed), each seed's 95 % family-bootstrap interval of balanced accuracy,
training time, the majority-class baseline, and for the first model its per-element test
recall and most confused pairs. Then every other model against the first, paired: the same
test atoms and the same bootstrap resamples of near-copy groups (test_predictions.npz of
runs with the same seed), with the 95 % interval of the difference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRICS = ("accuracy", "balanced_accuracy", "top3_accuracy")


def runs_of(root: Path, model: str) -> list[dict]:
    """metrics.json of <root>/<model>_s<seed> for every finished seed, in seed order."""
    seeds = {p: p.name[len(model) + 2:] for p in root.glob(f"{model}_s*") if p.is_dir()}
    found = sorted((p for p, s in seeds.items() if s.isdigit()), key=lambda p: int(seeds[p]))
    return [m for m in (common.load_json(p / "metrics.json") for p in found) if m]


def model_row(model: str, runs: Sequence[dict]) -> dict:
    row = {"model": model, "seeds": len(runs), "epochs": runs[0]["flags"]["epochs"]}
    for m in METRICS:
        values = [r["test"][m] for r in runs]
        row[m], row[f"{m}_std"] = common.mean_std(values)
        row[f"{m}_runs"] = " / ".join(f"{v:.3f}" for v in values)
    row["balanced_accuracy_95"] = " / ".join(
        "[{:.3f}, {:.3f}]".format(*r["test"]["intervals"]["balanced_accuracy"])
        for r in runs if r["test"].get("intervals"))
    row["validation_balanced_accuracy_runs"] = " / ".join(  # what choices were made on
        f"{r['validation']['balanced_accuracy']:.3f}" for r in runs if r.get("validation"))
    row["train_s"] = float(np.mean([r["timing"]["train_s"] for r in runs]))
    return row


def paired_rows(root: Path, first: str, others: Sequence[str]) -> list[dict]:
    """Each other model against `first` on the same test atoms, seed by seed."""
    from cryknn import evaluate

    rows = []
    for model in others:
        for base in sorted(root.glob(f"{first}_s*")):
            seed = base.name[len(first) + 2:]
            a, b = base / "test_predictions.npz", root / f"{model}_s{seed}" / "test_predictions.npz"
            if not (a.is_file() and b.is_file()):
                continue
            with np.load(a) as fa, np.load(b) as fb:
                diff = evaluate.paired_difference(dict(fa), dict(fb))["balanced_accuracy"]
            rows.append({"model": model, "against": first, "seed": seed,
                         "difference": diff["difference"],
                         "interval_95": "[{:+.3f}, {:+.3f}]".format(*diff["interval"]),
                         "excludes_0": diff["excludes_zero"]})
    return rows


def per_element(runs: Sequence[dict]) -> list[dict]:
    """Mean test recall per element over seeds, with the support."""
    elements = runs[0]["elements"]
    return [{"element": e,
             "recall": float(np.mean([r["test"]["per_element"][e]["recall"] for r in runs])),
             "support": runs[0]["test"]["per_element"][e]["support"]} for e in elements]


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workroot", str(common.SCRATCH / "default"), "The runs' folder.")
    flags.DEFINE_string("models", "graph,masked,mlp,two_stage", "Run name prefixes.")
    flags.DEFINE_string("json", None, "Write the tables here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import evaluate

    FLAGS = flags.FLAGS
    root = Path(FLAGS.workroot)
    models = [m for m in FLAGS.models.split(",") if runs_of(root, m)]
    if not models:
        print(f"no finished runs under {root}", file=sys.stderr)
        return 1
    rows = [model_row(m, runs_of(root, m)) for m in models]
    first = runs_of(root, models[0])
    baseline = first[0]["majority_baseline"]
    print(common.markdown_table(
        rows, ["model", "seeds", "epochs", "accuracy", "balanced_accuracy",
               "balanced_accuracy_std", "balanced_accuracy_runs", "balanced_accuracy_95",
               "top3_accuracy", "train_s"]))
    print(f"majority baseline: accuracy {baseline['accuracy']:.3f}, balanced accuracy "
          f"{baseline['balanced_accuracy']:.3f}, top-3 {baseline['top3_accuracy']:.3f}")
    recalls = per_element(first)
    print(common.markdown_table(recalls, ["element", "recall", "support"]))
    cm = sum(np.asarray(r["test"]["confusion_matrix"]["counts"]) for r in first)
    pairs = evaluate.most_confused_pairs(cm, first[0]["elements"], 8)
    print(common.markdown_table(pairs, ["true", "predicted", "count", "fraction_of_true"]))
    paired = paired_rows(root, models[0], models[1:])
    if paired:
        print("paired differences in test balanced accuracy (same atoms, same resamples):")
        print(common.markdown_table(paired, ["model", "against", "seed", "difference",
                                             "interval_95", "excludes_0"]))
    if FLAGS.json:
        common.write_json(FLAGS.json, {"rows": rows, "baseline": baseline,
                                       "per_element": recalls, "most_confused": pairs,
                                       "paired": paired})
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/headline.py",
                     define_flags=define_flags)
