"""Score the element of every site of crystal structures.

  python -m cryknn.predict [--workdir=W | --model_name=NAME] [--out=F.csv] PATH ...
  cryknn predict PATH ...

PATHs are CIF files or folders (searched recursively). Without --workdir the model shipped
with the package scores them (`--model_name`, default 'default'); --workdir selects a model
you trained with `cryknn train`. Every site (a row of the CIF's atom-site loop, with all its
symmetry copies; `--per_atom` for one line per unit-cell atom) gets one line: the given
element, the element the model predicts with its probability, and p(given), the model's
probability of the element the file states. Sites with p(given) < --threshold are marked
IMPLAUSIBLE. Each structure gets a plausibility score (the geometric mean of p(given) over
its atoms whose element the model knows) and warnings where its geometry is absurd.

Files that yield no structure are named on one line each with the reason; blocks skipped
inside otherwise readable files are noted the same way. Exit status: 0 when every file was
read, 1 when some were not, 2 for bad flags or an unusable model. Never a traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from cryknn import command
from cryknn import errors
from cryknn import structures as structures_lib
from cryknn import util

USAGE = """\
usage: {prog} [--workdir=W | --model_name=NAME] [--out=F.csv] PATH [PATH ...]

Scores every site of the structures in CIF files or folders (recursive): the predicted
element, and p(given), the model's probability of the element the file states."""


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Workdir of a model you trained (cryknn train); "
                        "default: the model shipped with cryknn.")
    flags.DEFINE_string("model_name", "default", "Which shipped model scores (without "
                        "--workdir): default (geometry only) or masked (also sees the "
                        "neighbours' elements).")
    flags.DEFINE_string("out", None, "Also write one CSV row per site (or atom) here.")
    flags.DEFINE_float("threshold", 0.05, "Mark sites whose given element has p below this; "
                       "in (0, 1).")
    flags.DEFINE_bool("implausible_only", False, "Print only the implausible sites (the header "
                      "line of every structure is still printed; --out still gets every site).")
    flags.DEFINE_bool("per_atom", False, "One line (and CSV row) per unit-cell atom instead "
                      "of per site.")
    flags.DEFINE_integer("batch_size", 4096, "Atoms per forward pass.", lower_bound=1)
    flags.DEFINE_integer("max_file_mb", 256, "Files larger than this (MB) are skipped "
                         "unread.", lower_bound=1)
    command.define_dataclass_flags(structures_lib.ReadOptions)


def check_arguments(paths: Sequence[str], threshold: float, out: str | None) -> None:
    if not paths:
        raise errors.ConfigError("name at least one CIF file or folder")
    if not 0 < threshold < 1:
        raise errors.ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    if out is not None:
        import os

        folder = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise errors.ConfigError(f"cannot write --out={out}")
        command.check_output(out, paths)


def run_predict(paths: Sequence[str], workdir: str | None, model_name: str, out: str | None,
                threshold: float, *, batch_size: int = 4096, implausible_only: bool = False,
                per_atom: bool = False, options: structures_lib.ReadOptions | None = None,
                stdout=sys.stdout, stderr=sys.stderr) -> int:
    """Scores the structures in `paths` and prints them; returns the exit status."""
    from cryknn import neighbours
    from cryknn import scoring

    check_arguments(paths, threshold, out)
    model = scoring.load_model(workdir, model_name)
    neighbours.enable_compilation_cache()
    structures, messages, all_read = scoring.read_files(paths, options)
    for m in messages:
        print(m, file=stderr)
    scores, failed = scoring.score_isolated(model, structures, per_atom=per_atom,
                                            batch_size=batch_size)
    for skip in failed:
        print(f"{skip.file}: block {skip.block or '?'} not scored: {util.one_line(skip.reason)}",
              file=stderr)
    print(model.describe(), file=stdout)
    for score in scores:
        print(scoring.format_structure(score, threshold, implausible_only), file=stdout)
    if out is not None:
        scoring.write_csv(out, scores)
        print(f"wrote {sum(len(s.sites) for s in scores)} rows to {out}", file=stdout)
    return 0 if all_read and not failed and scores else 1


def main(argv: list[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    structures_lib.MAX_FILE_BYTES = FLAGS.max_file_mb << 20
    try:
        return run_predict(argv[1:], FLAGS.workdir, FLAGS.model_name, FLAGS.out,
                           FLAGS.threshold, batch_size=FLAGS.batch_size,
                           implausible_only=FLAGS.implausible_only, per_atom=FLAGS.per_atom,
                           options=command.dataclass_from_flags(structures_lib.ReadOptions))
    except (errors.UserError, KeyboardInterrupt, OSError):
        raise  # one line, exit 2 (a full disk, an unwritable --out)
    except Exception as e:  # noqa: BLE001 - a scoring tool never shows a traceback
        print(f"error: {type(e).__name__}: {util.one_line(e, 300)}", file=sys.stderr)
        return 1


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, module="cryknn.predict", define_flags=define_flags,
                     argv=argv)


if __name__ == "__main__":
    run()
