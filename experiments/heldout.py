"""A held-out evaluation never tuned on: a trained model on real crystals of another kind.

    python experiments/heldout.py [--cifs=../shared/data/cod] [--workdir=W | --model_name=default]
        [--json=F]

Reads every structure of a CIF folder (by default the COD files beside the repository:
inorganic, organic and metal-organic crystals, where the training data are CoRE MOF
frameworks), scores every atom whose element the model knows, and reports accuracy,
balanced accuracy (mean per-element recall over the elements present), top-3 accuracy and
per-element recall, next to the majority-class baseline. Nothing here feeds back into any
choice of model or hyperparameter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def evaluate_structures(model, structures) -> dict:
    """Metrics of `model` on the atoms of `structures` whose element it classifies."""
    from cryknn import evaluate

    class_of = {z: i for i, z in enumerate(model.saved.atomic_numbers)}
    labels, probs = [], []
    for s, p in zip(structures, model.predict_proba(structures)):
        c = np.array([class_of.get(int(z), -1) for z in s.numbers])
        labels.append(c[c >= 0])
        probs.append(p[c >= 0])
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    cm, hits = evaluate.confusion_counts(labels, probs, len(model.elements))
    metrics = evaluate.metrics_from_confusion(cm, hits, model.elements)
    support = cm.sum(axis=1)
    metrics["majority_baseline"] = evaluate.majority_baseline(support, cm)
    metrics["elements_present"] = [e for e, n in zip(model.elements, support) if n]
    return metrics


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("cifs", str(common.DEFAULT_COD), "Folder of CIF files.")
    flags.DEFINE_string("workdir", None, "A trained workdir (default: the shipped model).")
    flags.DEFINE_string("model_name", "default", "The shipped model, without --workdir.")
    flags.DEFINE_string("json", None, "Write the metrics here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import neighbours, scoring

    FLAGS = flags.FLAGS
    structures, skips = common.read_structures("cod", None, FLAGS.cifs)
    structures, unusable = neighbours.split_featurizable(structures)
    model = scoring.load_model(FLAGS.workdir, FLAGS.model_name)
    metrics = evaluate_structures(model, structures)
    print(f"{model.describe()}\n{len(structures)} structures from {FLAGS.cifs} "
          f"({len(skips) + len(unusable)} skipped), {metrics['num_atoms']} atoms of modelled "
          f"elements: accuracy {metrics['accuracy']:.4f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f} over {len(metrics['elements_present'])} "
          f"elements, top-3 {metrics['top3_accuracy']:.4f}; majority baseline accuracy "
          f"{metrics['majority_baseline']['accuracy']:.4f}")
    rows = [{"element": e, **v} for e, v in metrics["per_element"].items() if v["support"]]
    print(common.markdown_table(rows, ["element", "support", "recall", "precision"]))
    if FLAGS.json:
        common.write_json(FLAGS.json, {"cifs": FLAGS.cifs, "model": model.describe(),
                                       "structures": len(structures), **metrics})
    return 0


if __name__ == "__main__":
    from cryknn import command

    command.run_tool(main, usage=__doc__, module="experiments/heldout.py",
                     define_flags=define_flags)
