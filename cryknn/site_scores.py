"""What checking structures gives, and how it is written out.

A `StructureScore` per structure holds a `SiteScore` per CIF site (or per atom): the element
given and predicted, p(given), the top 3 and the site's flag; `Scores` is a list of them
that converts to pandas and HTML. Text for the terminal (`format_structure`,
`format_summary`, within WIDTH columns), the CSV of `cryknn predict --out`, and the flagged
structures as CIF or extended XYZ with the flags per atom (`write_flagged`). Computing the
scores is `cryknn.scoring`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from cryknn import cif
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import util

CSV_COLUMNS = ("structure_id", "site_label", "given_element", "predicted_element",
               "p_predicted", "p_given", "multiplicity", "site_row", "atom_index",
               "structure_warnings", "structure_plausibility", "top3", "p_vs_adjacent",
               "flag")
FLAGS = ("implausible", "outside_domain", "")
# A structure is mostly outside the domain when more than this share of its atoms is.
MOSTLY_OUTSIDE = 0.5
WIDTH = 100  # terminal output fits this many columns
MAX_LABEL = 16


@dataclasses.dataclass
class SiteScore:
    """One site (or, per atom, one atom) of one structure."""

    structure_id: str
    site_label: str  # the CIF label, with '#<row>' when several sites share it
    given: str  # element symbol in the file
    predicted: str
    p_predicted: float
    p_given: float | None  # None: the given element is not one the model knows
    multiplicity: int  # unit-cell atoms this site stands for
    site_row: int  # 1-based row of the atom-site loop
    atom_index: int | None = None  # per-atom rows: the atom's index in the unit cell
    top: list = dataclasses.field(default_factory=list)  # [(element, p)], 3 most probable
    flag: str = ""  # 'implausible', 'outside_domain' or '' (FLAGS)
    # p(given) / (p(given) + p(likeliest element next to it in Z)); None: no such element
    # modelled, or the given element is not (scoring.p_vs_adjacent)
    p_vs_adjacent: float | None = None


@dataclasses.dataclass
class StructureScore:
    structure_id: str
    sites: list[SiteScore]
    plausibility: float | None  # geometric mean of p(given) over modelled atoms
    modelled_atoms: int
    num_atoms: int
    warnings: list[str]

    def implausible(self, threshold: float | None = None) -> list[SiteScore]:
        """The sites flagged implausible (or, given a threshold, the sites in the domain
        with p(given) below it, whatever their flags say)."""
        if threshold is None:
            return [s for s in self.sites if s.flag == "implausible"]
        return [s for s in self.sites if s.flag != "outside_domain" and s.p_given is not None
                and s.p_given < threshold]

    def outside_domain(self) -> list[SiteScore]:
        return [s for s in self.sites if s.flag == "outside_domain"]

    @property
    def outside_atoms(self) -> int:
        """Unit-cell atoms of the sites outside the model's domain."""
        return sum(s.multiplicity for s in self.outside_domain())

    @property
    def mostly_outside_domain(self) -> bool:
        return self.outside_atoms > MOSTLY_OUTSIDE * max(self.num_atoms, 1)


class Scores(list):
    """StructureScores, one per structure; `to_pandas()` gives one row per site."""

    def rows(self) -> list[dict]:
        """The CSV's rows (formatted text), one per site."""
        return [dict(zip(CSV_COLUMNS, _csv_row(score, site))) for score in self
                for site in score.sites]

    def to_pandas(self, per: str = "site"):
        """A typed DataFrame (needs the pandas extra: pip install 'cryknn[pandas]').

        per='site': the CSV's columns, one row per site (or atom); probabilities are floats,
        NaN where the given element is not modelled. per='structure': one row per structure
        (structure_id, plausibility, modelled_atoms, num_atoms, num_sites, warnings)."""
        from cryknn import extras  # pandas: an extra

        extras.require("pandas", "Scores.to_pandas")
        import pandas as pd

        if per == "structure":
            return pd.DataFrame(_structure_record(s) for s in self).astype(
                {"plausibility": float})
        if per != "site":
            raise errors.ConfigError(f"per must be 'site' or 'structure', got {per!r}")
        frame = pd.DataFrame([_site_record(score, t) for score in self for t in score.sites],
                             columns=list(CSV_COLUMNS))
        return frame.astype({"p_predicted": float, "p_given": float, "multiplicity": int,
                             "site_row": int, "atom_index": "Int64",
                             "structure_plausibility": float, "p_vs_adjacent": float})

    def to_html(self, path: str, structures, threshold: float = 0.05, **kwargs) -> int:
        """Writes the HTML report of these scores and the `structures` scored (see
        cryknn.report.write_html); returns the structures in it."""
        from cryknn import report

        return report.write_html(path, structures, self, threshold=threshold, **kwargs)


def _site_record(score: StructureScore, t: SiteScore) -> list:
    nan = float("nan")
    return [t.structure_id, t.site_label, t.given, t.predicted, t.p_predicted,
            nan if t.p_given is None else t.p_given, t.multiplicity, t.site_row,
            t.atom_index, "; ".join(score.warnings),
            nan if score.plausibility is None else score.plausibility, _top3_text(t),
            nan if t.p_vs_adjacent is None else t.p_vs_adjacent, t.flag]


def _structure_record(score: StructureScore) -> dict:
    return {"structure_id": score.structure_id,
            "plausibility": float("nan") if score.plausibility is None else score.plausibility,
            "modelled_atoms": score.modelled_atoms, "num_atoms": score.num_atoms,
            "num_sites": len(score.sites), "warnings": "; ".join(score.warnings),
            "implausible_sites": len(score.implausible()),
            "outside_domain_sites": len(score.outside_domain()),
            "mostly_outside_domain": score.mostly_outside_domain}


def _top3_text(t: SiteScore) -> str:
    return " ".join(f"{element}:{p:.3f}" for element, p in t.top)


def format_structure(score: StructureScore, threshold: float | None = None,
                     implausible_only: bool = False) -> str:
    """Text block of one structure within WIDTH columns: a header line naming it (the only
    line that does), warnings, one line per site (per atom: the label with [atom index]).
    Implausible: the sites flagged so, or with a threshold, p(given) below it."""
    import textwrap

    flagged = score.implausible(threshold)
    flagged_ids = {id(t) for t in flagged}
    plaus = "-" if score.plausibility is None else f"{score.plausibility:.3f}"
    outside = len(score.outside_domain())
    tail = (f"  plausibility {plaus} ({score.modelled_atoms}/{score.num_atoms} atoms "
            f"modelled), {len(flagged)} implausible" + (f", {outside} outside domain"
                                                        if outside else ""))
    lines = [_fit(score.structure_id, WIDTH - len(tail)) + tail]
    if score.mostly_outside_domain:
        lines.append(_fit(f"  OUTSIDE DOMAIN: {score.outside_atoms} of {score.num_atoms} atoms "
                          f"have elements or environments unlike the training data", WIDTH))
    for w in score.warnings:
        lines += textwrap.wrap(w, WIDTH, initial_indent="  WARNING: ",
                               subsequent_indent=" " * 11)
    shown = flagged if implausible_only else score.sites
    labels = [_fit(t.site_label + ("" if t.atom_index is None else f"[{t.atom_index}]"),
                   MAX_LABEL) for t in shown]
    width = max([len(label) for label in labels] + [4])
    if shown:
        lines.append(f"  {'site':<{width}}  given  predicted   p(given)  atoms  top 3")
    for t, label in zip(shown, labels):
        given = "     -" if t.p_given is None else f"{t.p_given:6.3f}"
        mark = ("  not modelled" if t.p_given is None else  # outside the domain too
                "  outside domain" if t.flag == "outside_domain" else
                "  IMPLAUSIBLE" if id(t) in flagged_ids else "")
        top = " ".join(f"{e}:{p:.2f}" for e, p in t.top)
        lines.append(f"  {label:<{width}}  {t.given:<5}  {t.predicted:<3} {t.p_predicted:5.3f}"
                     f"     {given}  {t.multiplicity:5d}  {top}{mark}")
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """text, shortened in the middle to at most width characters."""
    if len(text) <= width:
        return text
    half = (width - 3) // 2
    return text[:half] + "..." + text[len(text) - (width - 3 - half):]


def format_summary(scores: Sequence[StructureScore], threshold: float | None, files: int,
                   not_read: int, worst: int = 5) -> str:
    """The closing summary of a run: files read and not, structures scored and flagged
    (with a site flagged implausible, or of p(given) < threshold), the `worst` least
    plausible structures."""
    flagged = sum(1 for score in scores if score.implausible(threshold))
    outside = sum(1 for score in scores if score.mostly_outside_domain)
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    lines = [f"summary: {plural(files, 'file')}, {plural(not_read, 'file')} not read; "
             f"{plural(len(scores), 'structure')} scored",
             f"flagged: {plural(flagged, 'structure')} with "
             + ("an implausible site" if threshold is None else
                f"a site of p(given) < {threshold:.3g}")
             + f"; {outside} mostly outside the model's domain"]
    ranked = sorted((score for score in scores if score.plausibility is not None),
                    key=lambda score: score.plausibility)[:worst]
    if ranked:
        lines.append(f"least plausible {len(ranked)}:")
        lines += [f"  {score.plausibility:.3f}  {_fit(score.structure_id, WIDTH - 9)}"
                  for score in ranked]
    return "\n".join(lines)


def _csv_row(score: StructureScore, t: SiteScore) -> list:
    return [t.structure_id, t.site_label, t.given, t.predicted, f"{t.p_predicted:.4f}",
            "" if t.p_given is None else f"{t.p_given:.4f}", t.multiplicity, t.site_row,
            "" if t.atom_index is None else t.atom_index, "; ".join(score.warnings),
            "" if score.plausibility is None else f"{score.plausibility:.4f}", _top3_text(t),
            "" if t.p_vs_adjacent is None else f"{t.p_vs_adjacent:.4f}", t.flag]


def write_csv(path: str, scores: Sequence[StructureScore]) -> None:
    import csv

    with util.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for score in scores:
            for t in score.sites:
                w.writerow(_csv_row(score, t))


FLAGGED_FORMATS = (".cif", ".xyz", ".extxyz")


def write_flagged(path: str, structures: Sequence[cif.Structure],
                  scores: Sequence[StructureScore], threshold: float | None = None) -> int:
    """Writes the structures with an implausible site, with the flags per atom: a CIF
    (`write_flagged_cif`) or, for .xyz / .extxyz, extended XYZ through ase with the
    per-atom arrays cryknn_p_given, cryknn_predicted and cryknn_flag. Returns how many."""
    if path.lower().endswith(".cif"):
        return write_flagged_cif(path, structures, scores, threshold)
    from cryknn import extras

    extras.require("ase", "writing extended XYZ")
    import ase.io

    images = []
    from cryknn import report

    for s, score in report.paired(structures, scores):
        if s is not None and score.implausible(threshold):
            atoms = s.to_ase()
            p_given, predicted, flag = _atom_flags(s, score, threshold)
            atoms.arrays["cryknn_p_given"] = np.array([np.nan if p is None else p
                                                       for p in p_given])
            atoms.arrays["cryknn_predicted"] = np.array(predicted)
            atoms.arrays["cryknn_flag"] = np.array(flag)
            atoms.info["structure_id"] = score.structure_id
            atoms.info["plausibility"] = score.plausibility
            images.append(atoms)
    with util.atomic_path(path, suffix=".xyz") as tmp:
        ase.io.write(tmp, images, format="extxyz")
    return len(images)


def _atom_flags(s: cif.Structure, score: StructureScore, threshold: float | None):
    """Per unit-cell atom: p(given) (None: not modelled), predicted element, flag
    ('implausible' (as StructureScore.implausible(threshold)), 'outside_domain',
    'not_modelled' (outside the domain: an element the model does not model) or '.')."""
    flagged_ids = {id(t) for t in score.implausible(threshold)}
    per_atom = any(t.atom_index is not None for t in score.sites)
    site_of = {(t.atom_index if per_atom else t.site_row - 1): t for t in score.sites}
    sites = [site_of[i if per_atom else int(s.site_index[i])] for i in range(s.num_atoms)]
    flags = ["not_modelled" if t.p_given is None else
             "outside_domain" if t.flag == "outside_domain" else
             "implausible" if id(t) in flagged_ids else "." for t in sites]
    return [t.p_given for t in sites], [t.predicted for t in sites], flags


def write_flagged_cif(path: str, structures: Sequence[cif.Structure],
                      scores: Sequence[StructureScore], threshold: float | None = None
                      ) -> int:
    """Writes every structure with an implausible site as a P1 CIF block of its unit-cell
    atoms, with the columns _atom_site_cryknn_p_given, _atom_site_cryknn_predicted and
    _atom_site_cryknn_flag ('implausible', 'outside_domain', 'not_modelled' or '.'), which
    VESTA, Mercury, ase and gemmi read (unknown tags are kept or ignored). Returns the
    blocks written."""
    from cryknn import report

    blocks = [_flagged_block(s, score, threshold)
              for s, score in report.paired(structures, scores)
              if s is not None and score.implausible(threshold)]
    with util.atomic_open(path, "w") as f:
        f.write("# cryknn: structures with implausible sites\n" + "".join(blocks))
    return len(blocks)


def _flagged_block(s: cif.Structure, score: StructureScore, threshold: float | None) -> str:
    import gemmi

    p_given, predicted, flags = _atom_flags(s, score, threshold)
    a, b, c = np.linalg.norm(s.lattice, axis=1)
    cosines = [s.lattice[i] @ s.lattice[j] / (n_i * n_j) for i, j, n_i, n_j in
               ((1, 2, b, c), (0, 2, a, c), (0, 1, a, b))]
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", score.structure_id)
    lines = [f"data_{name}", f"_cell_length_a {a:.6f}", f"_cell_length_b {b:.6f}",
             f"_cell_length_c {c:.6f}", f"_cell_angle_alpha {angles[0]:.6f}",
             f"_cell_angle_beta {angles[1]:.6f}", f"_cell_angle_gamma {angles[2]:.6f}",
             "_symmetry_space_group_name_H-M 'P 1'", "loop_"]
    lines += [f"_atom_site_{tag}" for tag in (
        "label", "type_symbol", "fract_x", "fract_y", "fract_z", "occupancy",
        "cryknn_p_given", "cryknn_predicted", "cryknn_flag")]
    for i in range(s.num_atoms):
        p = "?" if p_given[i] is None else f"{p_given[i]:.4f}"
        x, y, z = s.frac[i]
        symbol = elements_lib.symbol(int(s.numbers[i]))
        lines.append(f"{gemmi.cif.quote(str(s.labels[i]))} {symbol} "
                     f"{x:.6f} {y:.6f} {z:.6f} {float(s.occupancies[i]):.4f} {p} "
                     f"{predicted[i]} {flags[i]}")
    return "\n".join(lines) + "\n\n"
