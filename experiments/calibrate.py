"""Adds calibration to saved models: temperature, domain and checking rule, fitted on
the validation split of each model's dataset.

    python experiments/calibrate.py [--data_dir=D] [--dataset=NAME] MODEL_DIR ...

MODEL_DIR: a saved model folder (model.json + params.msgpack): `<workdir>/model` of a
training run, or `cryknn/pretrained/default` and `cryknn/pretrained/masked` for the shipped
ones. Each gets in its model.json `calibration` (temperature, its fit, the domain
reference's cutoff) and `checking` (the rule with equal margins to the two targets, at
most 5 % of the real validation structures flagged and at least 90 % of single Z+-1 swaps
caught, `checking.choose_rule`, and the rates there), and
`domain.npz` beside it (`cryknn.checking.calibrate_saved_model`). The model's dataset
must be built in --data_dir, with its feature cache or the time to compute it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository on sys.path)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data_dir", None, "Where the models' dataset is built (default: "
                        "TFDS's data dir).")
    flags.DEFINE_string("dataset", None, "Dataset whose validation split calibrates "
                        "(default: each model's own).")
    flags.DEFINE_integer("seed", 0, "Seed of the atom samples and the swaps.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import checking, errors

    FLAGS = flags.FLAGS
    if len(argv) < 2:
        raise errors.ConfigError("name at least one saved model folder")
    for folder in argv[1:]:
        checking.calibrate_saved_model(folder, FLAGS.data_dir, FLAGS.dataset, seed=FLAGS.seed)
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/calibrate.py",
                     define_flags=define_flags)
