"""Train a model on the embedded default data and ship it with the package.

    python experiments/train_pretrained.py --name=default [--workdir=W]
    python experiments/train_pretrained.py --name=masked --neighbour_elements [--workdir=W]
        [any flag of python -m cryknn.main; the defaults train the default model]
    python experiments/train_pretrained.py --name=masked_ensemble \
        --members=W0,W1,W2 [--data_dir=D]

Trains with `train.train_and_evaluate` in --workdir (default --workroot/<name>; a finished
run there is only read back, so a run made before can be shipped), then copies the
run's params-only export (<workdir>/model: model.json with the run definition, dataset
fingerprint and test metrics, and params.msgpack) to cryknn/pretrained/<name>/, where
`cryknn.load_model(name=...)` and `cryknn predict --model_name=...` find it, and fits
there what checking needs (`checking.calibrate_saved_model`: temperature, domain,
threshold, on the validation split).

With --members (finished workdirs of runs of the same elements, k and mode: other seeds,
or other architectures), it ships their exports as one ensemble
(`saved_model.save_ensemble`: probabilities averaged), measures its test metrics on the
dataset's test split (with family-bootstrap intervals), and calibrates the ensemble as a
whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRETRAINED = common.REPO / "cryknn" / "pretrained"


def define_flags() -> None:
    from absl import flags

    from cryknn import config
    from cryknn.cli import command

    command.define_dataclass_flags(config.Config)
    flags.DEFINE_string("name", "default", "The shipped model's name (its folder).")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "pretrained"), "Workdirs go here.")
    flags.DEFINE_string("workdir", None, "The run's workdir (default: <workroot>/<name>).")
    flags.DEFINE_list("members", None, "Ship an ensemble of these finished workdirs' models "
                      "instead of training one.")


def ensemble_test_metrics(folder: str, data_dir: str | None) -> dict:
    """Test metrics of the saved model in folder on its dataset's test split, as a
    training run stores them (num_atoms, accuracies, per element, intervals)."""
    import numpy as np

    from cryknn import evaluate, families, input_pipeline

    model, table, rows, labels = common.saved_model_test_split(folder, data_dir)
    probs = model.predict_table(table, rows)
    metrics, _ = evaluate.split_metrics(probs, labels, model.elements)
    groups = input_pipeline.structure_groups(model.saved.config.dataset, data_dir)
    per_structure = np.asarray([groups.get(sid) or families.family_of(sid)
                                for sid in table.structure_id.tolist()], dtype=str)
    metrics["intervals"] = evaluate.bootstrap_intervals(
        labels, probs, per_structure[table.structure_index[rows]], len(model.elements))
    keep = ("num_atoms", "accuracy", "balanced_accuracy", "top3_accuracy", "per_element",
            "intervals")
    return {key: metrics[key] for key in keep if key in metrics}


def ship_ensemble(target: Path, workdirs: list[str], data_dir: str | None) -> None:
    from cryknn import checking, checkpoints, saved_model, util

    shutil.rmtree(target, ignore_errors=True)
    saved_model.save_ensemble(str(target), [os.path.join(w, checkpoints.MODEL_FOLDER)
                                            for w in workdirs])
    drop_machine_paths(target)
    path = target / saved_model.MODEL_JSON
    info = json.loads(path.read_text())
    metrics = ensemble_test_metrics(str(target), data_dir)
    util.write_json(str(path), {**info, "test_metrics": metrics})
    checking.calibrate_saved_model(str(target), data_dir)


def drop_machine_paths(target: Path) -> None:
    """Every model.json under target (members included) records no folder of the machine
    that trained it: the run's data_dir and manual_dir become null."""
    from cryknn import saved_model, util

    for path in target.rglob(saved_model.MODEL_JSON):
        info = json.loads(path.read_text())
        config = info.get("run", {}).get("config", {})
        if any(config.get(key) for key in ("data_dir", "manual_dir")):
            config.update(data_dir=None, manual_dir=None)
            util.write_json(str(path), info)


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import checking, checkpoints, saved_model, train

    FLAGS = flags.FLAGS
    target = PRETRAINED / FLAGS.name
    if FLAGS.members:
        ship_ensemble(target, FLAGS.members, FLAGS.data_dir)
        metrics = {"test": saved_model.load(str(target)).info["test_metrics"]}
        return report(target, metrics)
    workdir = FLAGS.workdir or os.path.join(FLAGS.workroot, FLAGS.name)
    metrics = train.train_and_evaluate(common.run_config(), workdir)
    source = os.path.join(workdir, checkpoints.MODEL_FOLDER)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in (saved_model.MODEL_JSON, saved_model.PARAMS):
        shutil.copy2(os.path.join(source, name), target / name)
    drop_machine_paths(target)
    # Temperature, domain and checking threshold, fitted on the validation split.
    checking.calibrate_saved_model(str(target), FLAGS.data_dir, FLAGS.dataset)
    return report(target, metrics)


def report(target: Path, metrics: dict) -> int:
    from cryknn import saved_model

    shipped = saved_model.load(str(target))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"shipped {target}: {shipped.config.model}, k={shipped.k}, "
          f"{shipped.info['num_params']:,} parameters, {size / 1e6:.2f} MB; test accuracy "
          f"{metrics['test']['accuracy']:.4f}, balanced accuracy "
          f"{metrics['test']['balanced_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/train_pretrained.py",
                     define_flags=define_flags)
