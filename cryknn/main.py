"""Train and evaluate the element predictor: `python -m cryknn.main --k=5 [--workdir=W]`.

A thin absl entry point: flags -> `train.Config` -> `train.train_and_evaluate(config, workdir)`.
Bad flag values exit with status 2 and one readable line.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cryknn import train

_D = train.Config()

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go (default "
                    "./workdir/k<K>, ./workdir/k<K>_<model> for other models than mlp); "
                    "re-running with the same workdir resumes from its latest checkpoint.")
flags.DEFINE_string("dataset", _D.dataset, "TFDS dataset name/config of crystal structures.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (also holds the feature cache); "
                    "default: TFDS' own (~/tensorflow_datasets).")
flags.DEFINE_integer("k", _D.k, "Nearest-neighbour distances per atom (>= 1).")
flags.DEFINE_integer("num_elements", _D.num_elements,
                     "Classify the N most abundant elements of the train split.")
flags.DEFINE_string("elements", None, "Explicit element list, e.g. C,N,O,Li,Na,K,Al,Si,P,S "
                    "(overrides --num_elements).")
flags.DEFINE_integer("max_per_element", _D.max_per_element,
                     "Cap on training atoms per element (0: no cap).")
flags.DEFINE_string("model", _D.model, "mlp (default) or seed (the original two-stage model).")
flags.DEFINE_string("class_weighting", _D.class_weighting,
                    "none, inverse_frequency or sqrt_inverse_frequency.")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the selected training atoms.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size (atoms).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate (AdamW, cosine).")
flags.DEFINE_integer("seed", _D.seed, "Random seed (initialisation, atom cap, batch order).")
flags.DEFINE_integer("log_every", _D.log_every, "Steps between progress lines.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-process run; "
                  "each process reads its own part of the data; build the dataset first).")
flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0 "
                    "(default: detected by JAX on TPU pods, SLURM, ...).")
flags.DEFINE_integer("num_processes", None, "--multihost: number of processes (default: detected).")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index (default: detected).")

FLAGS = flags.FLAGS

CONFIG_FLAGS = ("dataset", "data_dir", "k", "num_elements", "elements", "max_per_element",
                "model", "class_weighting", "epochs", "batch_size", "learning_rate", "seed",
                "log_every", "multihost")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, but a bad flag is one line on stderr and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_from_flags() -> train.Config:
    return train.Config(**{name: FLAGS[name].value for name in CONFIG_FLAGS})


def default_workdir(config: train.Config) -> str:
    suffix = "" if config.model == "mlp" else f"_{config.model}"
    return os.path.join(".", "workdir", f"k{config.k}{suffix}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    config = config_from_flags()
    try:
        if config.multihost:  # before anything asks JAX about devices
            import jax
            jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
        train.train_and_evaluate(config, FLAGS.workdir or default_workdir(config))
    except train.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
