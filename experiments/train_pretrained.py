"""Train a model on the embedded default data and ship it with the package.

    python experiments/train_pretrained.py --name=default [--workdir=W]
    python experiments/train_pretrained.py --name=masked --neighbour_elements [--workdir=W]
        [any flag of python -m cryknn.main; the defaults train the default model]

Trains with `train.train_and_evaluate` in --workdir (default --workroot/<name>; a finished
run there is only read back, so a run made before can be shipped), then copies the
run's params-only export (<workdir>/model: model.json with the run definition, dataset
fingerprint and test metrics, and params.msgpack) to cryknn/pretrained/<name>/, where
`cryknn.load_model(name=...)` and `cryknn predict --model_name=...` find it, and fits
there what checking needs (`checking.calibrate_saved_model`: temperature, domain,
threshold, on the validation split).
"""

from __future__ import annotations

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


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import checking, checkpoints, saved_model, train

    FLAGS = flags.FLAGS
    workdir = FLAGS.workdir or os.path.join(FLAGS.workroot, FLAGS.name)
    metrics = train.train_and_evaluate(common.run_config(), workdir)
    source = os.path.join(workdir, checkpoints.MODEL_FOLDER)
    target = PRETRAINED / FLAGS.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in (saved_model.MODEL_JSON, saved_model.PARAMS):
        shutil.copy2(os.path.join(source, name), target / name)
    # Temperature, domain and checking threshold, fitted on the validation split.
    checking.calibrate_saved_model(str(target), FLAGS.data_dir, FLAGS.dataset)
    shipped = saved_model.load(str(target))
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"shipped {target}: {shipped.config.model}, k={shipped.k}, "
          f"{shipped.info['num_params']:,} parameters, {size / 1e6:.2f} MB; test accuracy "
          f"{metrics['test']['accuracy']:.4f}, balanced accuracy "
          f"{metrics['test']['balanced_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/train_pretrained.py",
                     define_flags=define_flags)
