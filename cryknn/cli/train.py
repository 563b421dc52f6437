"""Train and evaluate the element predictor.

  python -m cryknn.main --k=5 [--workdir=W] [any field of cryknn.config.Config as a flag]
  cryknn train --k=5 ...

A thin entry point: flags -> `config.Config` -> `train.train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import os
from typing import Sequence

from cryknn import config as config_lib
from cryknn import errors
from cryknn import extras
from cryknn.cli import command

USAGE = """\
usage: {prog} [--k=5] [--workdir=W] [flags]

Builds the dataset if needed (default: the embedded CoRE MOF 2019-ASR), featurises it
(cached per k), trains the element predictor and evaluates it on the test split; rerunning
with the same --workdir resumes."""


def define_flags() -> None:
    from absl import flags

    command.define_dataclass_flags(config_lib.Config)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go (default "
                        "./workdir/k<K>, or ./workdir/k<K>_<model> for other models than "
                        "the default); "
                        "rerunning with the same workdir resumes from its latest checkpoint.")
    flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0 "
                        "(default: detected by JAX on TPU pods, SLURM, ...).")
    flags.DEFINE_integer("num_processes", None, "--multihost: number of processes "
                         "(default: detected).")
    flags.DEFINE_integer("process_id", None, "--multihost: this process's index "
                         "(default: detected).")


def default_workdir(config: config_lib.Config) -> str:
    suffix = "" if config.model == config_lib.Config.model else f"_{config.model}"
    return os.path.join(".", "workdir", f"k{config.k}{suffix}")


def main(argv: list[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    extras.require("train", "cryknn train")  # before any work: never fail after hours
    config = command.dataclass_from_flags(config_lib.Config)
    if config.multihost:  # before anything asks JAX about devices
        import jax

        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    from cryknn import train

    train.train_and_evaluate(config, FLAGS.workdir or default_workdir(config))
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, module="cryknn.main", define_flags=define_flags,
                     argv=argv)


if __name__ == "__main__":
    run()
