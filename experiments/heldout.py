"""A held-out evaluation never tuned on: a trained model on real crystals of another kind.

    python experiments/heldout.py [--cifs=../shared/data/cod] [--workdir=W | --model_name=default]
        [--data_dir=D] [--json=F]

Reads every structure of a CIF folder (by default the COD files beside the repository:
inorganic, organic and metal-organic crystals, where the training data are CoRE MOF
frameworks), scores every atom whose element the model knows, and reports accuracy,
balanced accuracy (mean per-element recall over the elements present), top-3 accuracy and
per-element recall, next to the majority-class baseline, with 95 % bootstrap intervals over
the structures' families. Structures that are near-copies (`cryknn.nearcopies`) of any
structure of the model's training dataset build (its fingerprints.npz in --data_dir) are
left out and counted. Nothing here feeds back into any choice of model or hyperparameter.
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
    from cryknn import evaluate, families

    class_of = {z: i for i, z in enumerate(model.saved.atomic_numbers)}
    labels, probs, groups = [], [], []
    for s, p in zip(structures, model.predict_proba(structures)):
        c = np.array([class_of.get(int(z), -1) for z in s.numbers])
        labels.append(c[c >= 0])
        probs.append(p[c >= 0])
        groups.append(np.full(int((c >= 0).sum()), families.family_of(s.id)))
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    cm, hits = evaluate.confusion_counts(labels, probs, len(model.elements))
    metrics = evaluate.metrics_from_confusion(cm, hits, model.elements)
    metrics["intervals"] = evaluate.bootstrap_intervals(labels, probs, np.concatenate(groups),
                                                        len(model.elements))
    support = cm.sum(axis=1)
    metrics["majority_baseline"] = evaluate.majority_baseline(support, cm)
    metrics["elements_present"] = [e for e, n in zip(model.elements, support) if n]
    return metrics


def without_copies_of_training(model, structures, data_dir):
    """(structures that are no near-copy of a structure of the model's dataset build,
    {id: copied id} of the others)."""
    from cryknn import datasets, nearcopies

    folder = datasets.dataset_dir(model.saved.config.dataset, data_dir)
    path = Path(folder) / nearcopies.FINGERPRINTS_NPZ
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build {model.saved.config.dataset} in "
                                f"--data_dir first (python -m cryknn.data build)")
    reference = nearcopies.Fingerprints.load(str(path))
    copies = {q: r for q, r, _ in nearcopies.copies_of(nearcopies.fingerprints(structures),
                                                       reference, {})}
    return [s for s in structures if s.id not in copies], copies


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("cifs", str(common.DEFAULT_COD), "Folder of CIF files.")
    flags.DEFINE_string("workdir", None, "A trained workdir (default: the shipped model).")
    flags.DEFINE_string("model_name", "default", "The shipped model, without --workdir.")
    flags.DEFINE_string("data_dir", None, "Where the model's training dataset is built "
                        "(default: TFDS's data dir).")
    flags.DEFINE_string("json", None, "Write the metrics here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import neighbours, scoring

    FLAGS = flags.FLAGS
    structures, skips = common.read_structures("cod", None, FLAGS.cifs)
    structures, unusable = neighbours.split_featurizable(structures)
    model = scoring.load_model(FLAGS.workdir, FLAGS.model_name)
    structures, copies = without_copies_of_training(model, structures, FLAGS.data_dir)
    metrics = evaluate_structures(model, structures)
    print(f"{model.describe()}\n{len(structures)} structures from {FLAGS.cifs} "
          f"({len(skips) + len(unusable)} skipped, {len(copies)} near-copies of the training "
          f"dataset's structures left out), {metrics['num_atoms']} atoms of modelled "
          f"elements: accuracy {metrics['accuracy']:.4f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f} (95 % "
          f"[{metrics['intervals']['balanced_accuracy'][0]:.4f}, "
          f"{metrics['intervals']['balanced_accuracy'][1]:.4f}]) over "
          f"{len(metrics['elements_present'])} "
          f"elements, top-3 {metrics['top3_accuracy']:.4f}; majority baseline accuracy "
          f"{metrics['majority_baseline']['accuracy']:.4f}")
    rows = [{"element": e, **v} for e, v in metrics["per_element"].items() if v["support"]]
    print(common.markdown_table(rows, ["element", "support", "recall", "precision"]))
    if FLAGS.json:
        common.write_json(FLAGS.json, {"cifs": FLAGS.cifs, "model": model.describe(),
                                       "structures": len(structures),
                                       "near_copies_left_out": copies, **metrics})
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/heldout.py",
                     define_flags=define_flags)
