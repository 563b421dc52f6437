"""Scoring structures with a trained model: how plausible is each site's element?

For every site (today: a site label with all its symmetry copies) the model's probability
of the given element, p(given), and its own prediction; per structure the geometric mean of
p(given) over the atoms whose element the model knows (1 = the model agrees everywhere).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Sequence

import numpy as np

from cryknn import elements as elements_lib
from cryknn import neighbours
from cryknn import structures as structures_lib
from cryknn import util

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
    """Scores for Structure records with a `checkpoints.Trained` model."""
    import jax

    if not structures:
        return []
    k = trained.config.k
    found = neighbours.featurize(structures, k)
    x = np.concatenate([n.distances for n in found]).astype(np.float32)
    apply = jax.jit(lambda p, d: jax.nn.softmax(
        trained.model.apply({"params": p}, {"distances": d}, train=False)["logits"], -1))
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
    with util.atomic_open(path, "w", newline="") as f:
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
    structures, messages, all_read = [], [], True
    for path in paths:
        try:
            found, skips = structures_lib.read_cif(path)
        except Exception as e:  # the reader promises not to raise; be safe anyway
            found, skips = [], [structures_lib.Skip(path, "", f"{type(e).__name__}: {e}")]
        good, unusable = neighbours.split_featurizable(found)
        skips.extend(unusable)
        if not good:
            all_read = False
            reason = "; ".join(sk.reason for sk in skips[:3]) or "no structures in file"
            messages.append(f"{path}: not read: {util.one_line(reason)}")
        else:
            messages.extend(f"{path}: block {sk.block or '?'} skipped: {util.one_line(sk.reason)}"
                            for sk in skips)
        structures.extend(good)
    return structures, messages, all_read


