"""Build a dataset of crystal structures, or show its element statistics.

  python -m cryknn.data build --dataset=crystal_structures/core_mof_2019_asr [--data_dir=DIR]
  python -m cryknn.data build --dataset=crystal_structures/cif_dir --manual_dir=DIR
  python -m cryknn.data stats --dataset=crystal_structures/CONFIG [--data_dir=DIR] [--out=F.png]

The library behind it is `cryknn.datasets` (building, loading, statistics) and the TFDS
builder in `cryknn/datasets/crystal_structures/`.
"""

from __future__ import annotations

import os
from typing import Sequence

from cryknn import cif
from cryknn import errors
from cryknn import extras
from cryknn.cli import command

USAGE = """\
usage: {prog} build|stats [--dataset=crystal_structures/CONFIG] [flags]

build: build the TFDS dataset (configs core_mof_2019_asr, core_mof_2014, cif_dir with
       --manual_dir); prints what was read and what was skipped, with reasons.
stats: print atoms and structures per element and split, and draw them as a PNG."""
COMMANDS = ("build", "stats")


def define_flags() -> None:
    from absl import flags

    from cryknn import datasets

    flags.DEFINE_string("dataset", datasets.DEFAULT_DATASET, "TFDS name/config: "
                        "crystal_structures/" + "|".join(datasets.CONFIG_NAMES))
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)")
    flags.DEFINE_string("manual_dir", None, "folder tree of CIF files (cif_dir only)")
    flags.DEFINE_string("out", None, "stats: bar chart PNG (default: element_stats.png in "
                        "the dataset folder)")
    flags.DEFINE_integer("limit", None, "read only the first N CIF files / archive members "
                         "(smoke builds; recorded in build_info.json)", lower_bound=1)
    flags.DEFINE_integer("num_workers", None, "parsing processes (default: available CPUs)",
                         lower_bound=0)
    flags.DEFINE_string("beam_runner", None, "build with Apache Beam on this runner "
                        "(e.g. DirectRunner); needs apache-beam")
    flags.DEFINE_string("beam_options", None, "Beam pipeline options, e.g. "
                        "'--runner=DataflowRunner --project=P --region=R'")
    flags.DEFINE_boolean("overwrite", False, "build: rebuild even if already built")
    flags.DEFINE_integer("top", None, "stats: only the N most abundant training elements",
                         lower_bound=1)
    command.define_dataclass_flags(cif.ReadOptions)


def _beam_arguments(runner: str | None, options: str | None):
    """(beam_runner, PipelineOptions) from the flags; DataError without apache-beam."""
    if runner is None and options is None:
        return None, None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise errors.DataError("--beam_runner/--beam_options need apache-beam: "
                               "pip install apache-beam") from None
    return runner, PipelineOptions(options.split()) if options else None


def build_command(FLAGS) -> None:
    from cryknn import datasets

    runner, options = _beam_arguments(FLAGS.beam_runner, FLAGS.beam_options)
    datasets.build(FLAGS.dataset, FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                   limit=FLAGS.limit, num_workers=FLAGS.num_workers, beam_runner=runner,
                   beam_options=options, overwrite=FLAGS.overwrite,
                   read_options=command.dataclass_from_flags(cif.ReadOptions))


def stats_command(FLAGS) -> None:
    from cryknn import datasets

    if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
        raise errors.DataError(f"--data_dir {FLAGS.data_dir} is not a directory")
    if FLAGS.manual_dir:
        raise errors.DataError("--manual_dir is only for build")
    if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
        raise errors.DataError(f"--out {FLAGS.out}: its folder does not exist")
    datasets.check_built(FLAGS.dataset, FLAGS.data_dir)
    stats = datasets.element_stats(FLAGS.dataset, FLAGS.data_dir)
    print(datasets.format_stats(stats, FLAGS.top))
    out = FLAGS.out or os.path.join(stats["data_dir"], "element_stats.png")
    datasets.plot_stats(stats, out, top=FLAGS.top or 40)
    print(f"chart: {out}")


def main(argv: list[str]) -> int:
    from absl import flags

    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        raise errors.ConfigError(f"expected one command, build or stats; got "
                                 f"{' '.join(args) or 'nothing'}")
    extras.require("train", f"cryknn data {args[0]}")
    try:
        (build_command if args[0] == "build" else stats_command)(flags.FLAGS)
    except OSError as e:
        raise errors.DataError(f"{type(e).__name__}: {e}") from None
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, module="cryknn.data", define_flags=define_flags,
                     argv=argv)


if __name__ == "__main__":
    run()
