"""Score the elements of new structures with a trained model.

  python -m cryknn.predict --workdir=W [--out=F.csv] [--threshold=0.05] FILE.cif ...
  cryknn predict --workdir=W FILE.cif ...

For every structure read from the files (any CIF the reader accepts; ids are
`<file stem>:<block>`), every site gets one line: its given element, the element the model
predicts from the site's k-NN distances with its probability, and p(given), the
probability the model gives the element the file states. Sites with p(given) < --threshold
are marked IMPLAUSIBLE. Each structure gets a plausibility score: the geometric mean of
p(given) over its atoms whose element the model knows (1 = the model agrees everywhere).
Sites of elements outside the model's element list are shown with p(given) '-' and left
out of the score (`cryknn.scoring`).

Files that yield no structure are named on one line each with the reason; blocks skipped
inside otherwise readable files are noted the same way. Exit status: 0 when every file was
read, 1 when some were not, 2 for bad flags or a workdir without a trained model. Never a
traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from cryknn import command
from cryknn import errors
from cryknn import util

USAGE = """\
usage: python -m cryknn.predict [--workdir=W] [--out=F.csv] FILE.cif [FILE.cif ...]

Scores every site of the structures in the CIF files: the predicted element, and
p(given), the model's probability of the element the file states."""


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "./workdir/k5", "Workdir of a trained model (cryknn.main).")
    flags.DEFINE_string("out", None, "Also write one CSV row per site here.")
    flags.DEFINE_float("threshold", 0.05, "Mark sites whose given element has p below this.")
    flags.DEFINE_bool("implausible_only", False, "Print only the implausible sites (the header "
                      "line of every structure is still printed; --out still gets every site).")
    flags.DEFINE_integer("batch_size", 4096, "Atoms per forward pass.", lower_bound=1)


def run_predict(paths: Sequence[str], workdir: str, out: str | None, threshold: float,
                batch_size: int = 4096, implausible_only: bool = False, stdout=sys.stdout,
                stderr=sys.stderr) -> int:
    """Scores the structures in `paths` and prints them; returns the exit status."""
    from cryknn import checkpoints
    from cryknn import scoring

    if not paths:
        raise errors.ConfigError("name at least one CIF file")
    trained = checkpoints.load_trained(workdir)
    if out is not None:
        try:
            open(out, "a").close()
        except OSError as e:
            raise errors.ConfigError(f"cannot write --out={out}: {e.strerror or e}") from None
    structures, messages, all_read = scoring.read_files(paths)
    for m in messages:
        print(m, file=stderr)
    scores = scoring.score_structures(structures, trained, batch_size)
    note = ("" if trained.total_steps is None or trained.step >= trained.total_steps
            else f", training unfinished: step {trained.step} of {trained.total_steps}")
    print(f"model {trained.config.model} (k={trained.config.k}, elements "
          f"{','.join(trained.symbols)}) from {workdir}{note}", file=stdout)
    for score in scores:
        print(scoring.format_structure(score, threshold, implausible_only), file=stdout)
    if out is not None:
        scoring.write_csv(out, scores)
        print(f"wrote {sum(len(s.sites) for s in scores)} sites to {out}", file=stdout)
    return 0 if all_read else 1


def main(argv: list[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        return run_predict(argv[1:], FLAGS.workdir, FLAGS.out, FLAGS.threshold,
                           FLAGS.batch_size, FLAGS.implausible_only)
    except (errors.UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a scoring tool never shows a traceback
        print(f"error: {type(e).__name__}: {util.one_line(e, 300)}", file=sys.stderr)
        return 1


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, define_flags=define_flags, argv=argv)


if __name__ == "__main__":
    run()
