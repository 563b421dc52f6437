"""Score the elements of new structures with a trained model.

  python -m cryknn.predict --workdir=W [--out=F.csv] [--threshold=0.05] FILE.cif ...

For every structure read from the files (any CIF the reader accepts; ids are
`<file stem>:<block>`), every site (symmetry copies of a site label are one site) gets
one line: its given element, the element the model predicts from the site's k-NN
distances with its probability, and p(given), the probability the model gives the element
the file states. Sites with p(given) < --threshold are marked IMPLAUSIBLE. Each structure
gets a plausibility score: the geometric mean of p(given) over its atoms whose element the
model knows (1 = the model agrees everywhere). Sites of elements outside the model's
element list are shown with p(given) '-' and left out of the score.

Files that yield no structure are named on one line each with the reason; blocks skipped
inside otherwise readable files are noted the same way. Exit status: 0 when every file was
read, 1 when some were not, 2 for bad flags or a workdir without a trained model. Never a
traceback.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from typing import Sequence

from absl import app, flags, logging
import numpy as np

flags.DEFINE_string("workdir", "./workdir/k5", "Workdir of a trained model (cryknn.main).")
flags.DEFINE_string("out", None, "Also write one CSV row per site here.")
flags.DEFINE_float("threshold", 0.05, "Mark sites whose given element has p below this.")
flags.DEFINE_bool("implausible_only", False, "Print only the implausible sites (the header "
                  "line of every structure is still printed; --out still gets every site).")
flags.DEFINE_integer("batch_size", 4096, "Atoms per forward pass.")

FLAGS = flags.FLAGS

CSV_COLUMNS = ("structure_id", "site_label", "given_element", "predicted_element",
               "p_predicted", "p_given")


@dataclasses.dataclass
class SiteScore:
    """One site (a site label with all its symmetry copies) of one structure."""

    structure_id: str
    site_label: str
    given: str  # element symbol in the file
    predicted: str
    p_predicted: float
    p_given: float | None  # None: the given element is not one the model knows
    multiplicity: int


@dataclasses.dataclass
class StructureScore:
    structure_id: str
    sites: list[SiteScore]
    plausibility: float | None  # geometric mean of p(given) over modelled atoms
    modelled_atoms: int
    num_atoms: int


def score_structures(structures, trained, batch_size: int = 4096) -> list[StructureScore]:
    """Scores for Structure records with a `train.Trained` model."""
    import jax
    from cryknn import elements as elements_lib
    from cryknn import featurize

    if not structures:
        return []
    k = trained.config.k
    neighbours = featurize.featurize(structures, k)
    x = np.concatenate([n.distances for n in neighbours]).astype(np.float32)
    apply = jax.jit(lambda p, d: jax.nn.softmax(
        trained.model.apply({"params": p}, d, train=False)["logits"], -1))
    probs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - len(chunk) if len(x) > batch_size else 0
        out = apply(trained.params, np.pad(chunk, ((0, pad), (0, 0)), mode="edge"))
        probs.append(np.asarray(out)[:len(chunk)])
    probs = np.concatenate(probs)
    class_of = {z: i for i, z in enumerate(trained.atomic_numbers)}
    symbols = trained.symbols

    results, offset = [], 0
    for s in structures:
        p = probs[offset:offset + s.num_atoms]
        offset += s.num_atoms
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (label, z) in enumerate(zip(s.labels, s.numbers)):
            groups.setdefault((str(label), int(z)), []).append(i)
        sites, log_p = [], []
        for (label, z), idx in groups.items():
            mean = p[idx].mean(axis=0)
            best = int(np.argmax(mean))
            c = class_of.get(z)
            p_given = float(mean[c]) if c is not None else None
            sites.append(SiteScore(s.id, label, elements_lib.symbol(z), symbols[best],
                                   float(mean[best]), p_given, len(idx)))
            if c is not None:
                log_p.extend(np.log(np.maximum(p[idx, c], 1e-12)).tolist())
        plaus = float(math.exp(np.mean(log_p))) if log_p else None
        results.append(StructureScore(s.id, sites, plaus, len(log_p), s.num_atoms))
    return results


def format_structure(score: StructureScore, threshold: float,
                     implausible_only: bool = False) -> str:
    """Text block of one structure: a header line and one line per site."""
    flagged = [t for t in score.sites if t.p_given is not None and t.p_given < threshold]
    plaus = "-" if score.plausibility is None else f"{score.plausibility:.3f}"
    lines = [f"{score.structure_id}: plausibility {plaus} (geometric mean p(given) over "
             f"{score.modelled_atoms} of {score.num_atoms} atoms); {len(flagged)} implausible "
             f"site{'s' if len(flagged) != 1 else ''}"]
    width = max([len(t.site_label) for t in score.sites] + [4])
    if flagged or not implausible_only:
        lines.append(f"  {score.structure_id}  {'site':<{width}}  given  predicted      "
                     f"p(given)")
    for t in (flagged if implausible_only else score.sites):
        if t.p_given is None:
            given, mark = "     -", "  (element not modelled)"
        else:
            given = f"{t.p_given:6.3f}"
            mark = "  IMPLAUSIBLE" if t.p_given < threshold else ""
        lines.append(f"  {score.structure_id}  {t.site_label:<{width}}  {t.given:<5}  "
                     f"{t.predicted:<3} {t.p_predicted:5.3f}      {given}{mark}")
    return "\n".join(lines)


def write_csv(path: str, scores: Sequence[StructureScore]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for score in scores:
            for t in score.sites:
                p_given = "" if t.p_given is None else f"{t.p_given:.4f}"
                w.writerow([t.structure_id, t.site_label, t.given, t.predicted,
                            f"{t.p_predicted:.4f}", p_given])


def read_files(paths: Sequence[str]):
    """(structures, messages, all_read): every structure the reader accepts from `paths`, one
    message line per unreadable file or skipped block, and whether every file gave a structure."""
    from cryknn import featurize
    from cryknn import structures as structures_lib

    structures, messages, all_read = [], [], True
    for path in paths:
        try:
            found, skips = structures_lib.read_cif(path)
        except Exception as e:  # the reader promises not to raise; be safe anyway
            found, skips = [], [structures_lib.Skip(path, "", f"{type(e).__name__}: {e}")]
        good = []
        for s in found:
            try:
                featurize.validate_cell(s.lattice, s.frac)
                good.append(s)
            except featurize.FeaturizeError as e:
                skips.append(structures_lib.Skip(path, s.id.split(":", 1)[-1], str(e)))
        if not good:
            all_read = False
            reason = "; ".join(sk.reason for sk in skips[:3]) or "no structures in file"
            messages.append(f"{path}: not read: {_one_line(reason)}")
        else:
            messages.extend(f"{path}: block {sk.block or '?'} skipped: {_one_line(sk.reason)}"
                            for sk in skips)
        structures.extend(good)
    return structures, messages, all_read


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(paths: Sequence[str], workdir: str, out: str | None, threshold: float,
        batch_size: int = 4096, implausible_only: bool = False, stdout=sys.stdout,
        stderr=sys.stderr) -> int:
    from cryknn import train

    if not paths:
        print("error: name at least one CIF file", file=stderr)
        return 2
    try:
        trained = train.load_trained(workdir)
    except train.ConfigError as e:
        print(f"error: {e}", file=stderr)
        return 2
    if out is not None:
        try:
            open(out, "a").close()
        except OSError as e:
            print(f"error: cannot write --out={out}: {e.strerror or e}", file=stderr)
            return 2
    structures, messages, all_read = read_files(paths)
    for m in messages:
        print(m, file=stderr)
    scores = score_structures(structures, trained, batch_size)
    note = ("" if trained.total_steps is None or trained.step >= trained.total_steps
            else f", training unfinished: step {trained.step} of {trained.total_steps}")
    print(f"model {trained.config.model} (k={trained.config.k}, elements "
          f"{','.join(trained.symbols)}) from {workdir}{note}", file=stdout)
    for score in scores:
        print(format_structure(score, threshold, implausible_only), file=stdout)
    if out is not None:
        write_csv(out, scores)
        print(f"wrote {sum(len(s.sites) for s in scores)} sites to {out}", file=stdout)
    return 0 if all_read else 1


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        return run(argv[1:], FLAGS.workdir, FLAGS.out, FLAGS.threshold, FLAGS.batch_size,
                   FLAGS.implausible_only)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for a scoring tool; say what failed
        print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
