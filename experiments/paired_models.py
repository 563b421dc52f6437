"""Models compared on the same test atoms (paired), where one side may be a saved model
only (a shipped model, an ensemble member) rather than a finished run's workdir.

    python experiments/paired_models.py --data_dir=D \
        --a=cryknn/pretrained/masked_ensemble/members/0,... --b=runs/mg5_s0,... [--json=F]

Pairs --a[i] with --b[i]: B - A in test accuracy and balanced accuracy with the 95 %
interval of the difference, from the same bootstrap resamples of near-copy groups
(`evaluate.paired_difference`). A workdir contributes its test_predictions.npz; a saved
model (a folder with model.json) predicts the atoms of the first workdir's
test_predictions.npz (the same dataset build, k and elements; masked-atom models hide each
atom's site, as in training), so at least one side of the first pair is a workdir.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data_dir", None, "Where the models' dataset is built.")
    flags.DEFINE_list("a", None, "Workdirs or saved-model folders: the first of each pair.")
    flags.DEFINE_list("b", None, "Workdirs or saved-model folders: the second of each pair.")
    flags.DEFINE_string("json", None, "Write the rows here.")


def is_workdir(path: str) -> bool:
    return (Path(path) / "test_predictions.npz").is_file()


def load_predictions(path: str) -> dict:
    with np.load(Path(path) / "test_predictions.npz") as f:
        return dict(f)


def predictions_of_export(folder: str, reference: dict, data_dir: str | None) -> dict:
    """test_predictions.npz contents for a saved model: its predicted classes on the atoms
    `reference` (a run's test_predictions) lists, in the same order."""
    from cryknn import errors

    model, table, rows, labels = common.saved_model_test_split(folder, data_dir)
    if list(model.elements) != [str(e) for e in reference["elements"]]:
        raise errors.ConfigError(f"{folder} predicts {model.elements}, the runs "
                                 f"{list(reference['elements'])}")
    if not (np.array_equal(table.atom_structure_ids(rows), reference["structure_id"])
            and np.array_equal(labels, reference["label"])):
        raise errors.ConfigError(f"{folder}: its dataset build lists other test atoms "
                                 "than the runs")
    probs = model.predict_table(table, rows)
    return {**reference, "predicted": np.argmax(probs, axis=1).astype(np.int16)}


def paired_rows(a: str, b: str, predictions_a: dict, predictions_b: dict) -> list[dict]:
    """Rows of B - A (accuracy, balanced accuracy) from two test_predictions contents."""
    from cryknn import evaluate

    diff = evaluate.paired_difference(predictions_a, predictions_b)
    rows = []
    for metric in ("accuracy", "balanced_accuracy"):
        d = diff[metric]
        rows.append({"a": a, "b": b, "metric": metric, "a_value": d["a"], "b_value": d["b"],
                     "difference": d["difference"],
                     "interval_95": "[{:+.3f}, {:+.3f}]".format(*d["interval"]),
                     "excludes_0": d["excludes_zero"]})
    return rows


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import errors

    FLAGS = flags.FLAGS
    if not FLAGS.a or not FLAGS.b or len(FLAGS.a) != len(FLAGS.b):
        raise errors.ConfigError("--a and --b: two lists of the same length (the pairs)")
    runs = [p for p in FLAGS.a + FLAGS.b if is_workdir(p)]
    if not runs:
        raise errors.ConfigError("at least one of --a, --b must be a finished run's "
                                 "workdir (with test_predictions.npz): it lists the atoms")
    reference = load_predictions(runs[0])
    cache: dict[str, dict] = {}

    def predictions(path: str) -> dict:
        if path not in cache:
            cache[path] = (load_predictions(path) if is_workdir(path) else
                           predictions_of_export(path, reference, FLAGS.data_dir))
        return cache[path]

    rows = [row for a, b in zip(FLAGS.a, FLAGS.b)
            for row in paired_rows(a, b, predictions(a), predictions(b))]
    print(common.markdown_table(rows, list(rows[0])))
    if FLAGS.json:
        common.write_json(FLAGS.json, {"pairs": rows})
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/paired_models.py",
                     define_flags=define_flags)
