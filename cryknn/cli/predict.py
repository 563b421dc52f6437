"""Score the element of every site of crystal structures.

  python -m cryknn.predict [--workdir=W | --model_name=NAME] [--out=F.csv] [--html=F.html] PATH ...
  cryknn predict PATH ...

PATHs are structure files (CIF natively; POSCAR, extxyz and the other formats of
`cryknn.read` through the `ase` extra) or folders (searched recursively for CIFs). Without
--workdir a model shipped with the package scores them: by default the one that checks
best (the most single Z+-1 swaps caught on validation by its checking rule,
`scoring.checking_default`; `--model_name` picks one); --workdir selects a model you trained
with `cryknn train`. The output names the model and checking rule in use. Every site (a row of
the CIF's atom-site loop, with all its symmetry copies; `--per_atom` for one line per
unit-cell atom) gets one line: the given element, the element the model predicts with its
probability, and p(given), the model's (calibrated) probability of the element the file
states. Sites in the model's domain with p(given) < --threshold, or whose given element is
far less likely than the one next to it in Z (p(given) / (p(given) + p(neighbour)) <
--adjacent_threshold: the mis-assignment X-ray diffraction makes; both default to the
model's own, chosen on validation) are marked IMPLAUSIBLE; sites of elements the
model does not model, or with environments unlike its training data, are marked outside
domain, never implausible, and a structure mostly outside the domain says so in one line.
Each structure gets a plausibility score (the geometric mean of p(given) over its atoms
whose element the model knows) and warnings where its geometry is absurd.

Files that yield no structure are named on one line each with the reason; blocks skipped
inside otherwise readable files are noted the same way. A progress bar runs on stderr while
files are read; a closing summary counts files, structures scored and flagged, and names
the least plausible structures. --flagged_out writes the structures with implausible sites
as a CIF whose atom-site loop has the flags in a column; --html writes one self-contained
page (cryknn.report) with every structure in 3D, its flagged sites marked. Exit status: 0
when every file was read, 1 when some were not or nothing could be scored, 2 for bad flags
or an unusable model. Never a traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from cryknn import cif
from cryknn import errors
from cryknn import util
from cryknn.cli import command

USAGE = """\
usage: {prog} [--workdir=W | --model_name=NAME] [--out=F.csv] [--html=F] PATH...

Scores every site of the structures in files (CIF; POSCAR, extxyz, ... with the ase extra)
or folders (CIFs, recursive): the predicted element, and p(given), the model's probability
of the element the file states. `cryknn check` is the same command."""


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Workdir of a model you trained (cryknn train); "
                        "default: the model shipped with cryknn.")
    flags.DEFINE_string("model_name", None, "Which shipped model scores (without "
                        "--workdir): default (geometry only), masked (also sees the "
                        "neighbours' elements) or masked_ensemble (three masked seeds "
                        "averaged); unset: the one that checks best on validation "
                        "(scoring.checking_default).")
    flags.DEFINE_string("out", None, "Also write one CSV row per site (or atom) here.")
    flags.DEFINE_string("html", None, "Also write a report here: one self-contained HTML "
                        "page (no network needed) with a 3D view of every structure, its "
                        "flagged sites marked, and its sites table sortable by p(given).")
    flags.DEFINE_float("threshold", None, "Mark sites (in the model's domain) whose given "
                       "element has p below this; in (0, 1). Unset: the model's checking "
                       "threshold (chosen on validation), else 0.05.")
    flags.DEFINE_float("adjacent_threshold", None, "Also mark sites whose p(given) / "
                       "(p(given) + p(the element next to it in Z)) is below this; in [0, 1), "
                       "0 turns this test off. Unset: the model's own (chosen on "
                       "validation), if it has one.")
    flags.DEFINE_bool("implausible_only", False, "Print only the implausible sites (the header "
                      "line of every structure is still printed; --out still gets every site).")
    flags.DEFINE_string("flagged_out", None, "Also write the structures with implausible "
                        "sites here: .cif (P1, every atom; columns _atom_site_cryknn_p_given, "
                        "_atom_site_cryknn_predicted, _atom_site_cryknn_flag) or .xyz / "
                        ".extxyz (extended XYZ through ase, the same per-atom arrays).")
    flags.DEFINE_integer("worst", 5, "The summary names this many least plausible "
                         "structures.", lower_bound=0)
    flags.DEFINE_bool("per_atom", False, "One line (and CSV row) per unit-cell atom instead "
                      "of per site.")
    flags.DEFINE_integer("batch_size", 4096, "Atoms per forward pass.", lower_bound=1)
    flags.DEFINE_integer("max_file_mb", 256, "Files larger than this (MB) are skipped "
                         "unread.", lower_bound=1)
    command.define_dataclass_flags(cif.ReadOptions)


def check_arguments(paths: Sequence[str], threshold: float, out: str | None,
                    flag: str = "--out") -> None:
    if not paths:
        raise errors.ConfigError("name at least one CIF file or folder")
    if not 0 < threshold < 1:
        raise errors.ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    if out is not None:
        import os

        folder = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise errors.ConfigError(f"cannot write {flag}={out}")
        command.check_output(out, paths, flag)


def _check_flagged_out(paths: Sequence[str], threshold: float, flagged_out: str) -> None:
    from cryknn import extras
    from cryknn import site_scores

    check_arguments(paths, threshold, flagged_out, "--flagged_out")
    if not flagged_out.lower().endswith(site_scores.FLAGGED_FORMATS):
        raise errors.ConfigError(f"--flagged_out must end in .cif, .xyz or .extxyz, got "
                                 f"{flagged_out}")
    if not flagged_out.lower().endswith(".cif"):
        extras.require("ase", "--flagged_out as extended XYZ")


def _wrapped(text: str, width: int = 100) -> str:
    """The model's description within `width` columns: a long first line goes on as
    '  from <source>', anything longer still is wrapped."""
    import textwrap

    lines = text.splitlines()
    if lines and len(lines[0]) > width and " from " in lines[0]:
        head, source = lines[0].rsplit(" from ", 1)
        lines[:1] = [head, f"  from {source}"]
    return "\n".join(wrapped for line in lines
                     for wrapped in textwrap.wrap(line, width, subsequent_indent="  ") or [""])


def _read(paths: Sequence[str], options, stderr):
    """reading.read_files with a progress bar on stderr; its messages printed after it."""
    from cryknn import reading

    bar = util.ProgressBar("file")
    try:
        report = reading.read_files(paths, options, progress=bar.update)
    finally:
        bar.close()
    for m in report.messages:
        print(m, file=stderr)
    return report


def run_predict(paths: Sequence[str], workdir: str | None, model_name: str | None,
                out: str | None, threshold: float | None, *, batch_size: int = 4096,
                adjacent_threshold: float | None = None,
                implausible_only: bool = False, per_atom: bool = False,
                options: cif.ReadOptions | None = None,
                flagged_out: str | None = None, worst: int = 5, html: str | None = None,
                stdout=sys.stdout, stderr=sys.stderr) -> int:
    """Scores the structures in `paths` and prints them; returns the exit status."""
    from cryknn import neighbours
    from cryknn import reading
    from cryknn import scoring
    from cryknn import site_scores

    check_arguments(paths, 0.5 if threshold is None else threshold, out)
    if flagged_out is not None:
        _check_flagged_out(paths, 0.5 if threshold is None else threshold, flagged_out)
    if html is not None:
        check_arguments(paths, 0.5 if threshold is None else threshold, html, "--html")
    if adjacent_threshold is not None and not 0 <= adjacent_threshold < 1:
        raise errors.ConfigError(f"--adjacent_threshold must be in [0, 1), got "
                                 f"{adjacent_threshold}")
    reading.require_readers(paths)
    neighbours.enable_compilation_cache()  # first: loading keeps its traced shapes there
    model = scoring.load_model(workdir, model_name or scoring.checking_default())
    rule = model.rule_with(threshold, adjacent_threshold)
    report = _read(paths, options, stderr)
    if not report.structures:
        print(f"error: nothing to score: no structure read from {report.files} file(s) "
              f"(folders are searched for *.cif; name other files directly)", file=stderr)
        return 1
    bar = util.ProgressBar("structure")
    try:
        scores, failed = scoring.score_isolated(model, report.structures, per_atom=per_atom,
                                                batch_size=batch_size, progress=bar.update,
                                                threshold=threshold,
                                                adjacent_threshold=adjacent_threshold)
    finally:
        bar.close()
    for skip in failed:
        print(f"{skip.file}: block {skip.block or '?'} not scored: {util.one_line(skip.reason)}",
              file=stderr)
    print(_wrapped(model.describe()), file=stdout)
    print(_wrapped(model.checking_note(rule)), file=stdout)
    for score in scores:  # the sites flagged implausible by the rule
        print(site_scores.format_structure(score, None, implausible_only), file=stdout)
    if out is not None:
        site_scores.write_csv(out, scores)
        print(f"wrote {sum(len(s.sites) for s in scores)} rows to {out}", file=stdout)
    if flagged_out is not None:
        n = site_scores.write_flagged(flagged_out, report.structures, scores)
        print(f"wrote {n} structures with implausible sites to {flagged_out}", file=stdout)
    if html is not None:
        from cryknn import report as report_lib

        n = report_lib.write_html(html, report.structures, scores, threshold=rule.threshold,
                                  rule=rule.describe(), model=model)
        print(f"wrote the report of {n} structures to {html}", file=stdout)
    print(site_scores.format_summary(scores, None, report.files, report.not_read, worst),
          file=stdout)
    return 0 if report.all_read and not failed and scores else 1


def main(argv: list[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    cif.reader.MAX_FILE_BYTES = FLAGS.max_file_mb << 20
    try:
        return run_predict(argv[1:], FLAGS.workdir, FLAGS.model_name, FLAGS.out,
                           FLAGS.threshold, batch_size=FLAGS.batch_size,
                           adjacent_threshold=FLAGS.adjacent_threshold,
                           implausible_only=FLAGS.implausible_only, per_atom=FLAGS.per_atom,
                           flagged_out=FLAGS.flagged_out, worst=FLAGS.worst, html=FLAGS.html,
                           options=command.dataclass_from_flags(cif.ReadOptions))
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
