"""The HTML report of scored structures: one self-contained page to look at.

  scores = model.check(structures)
  report.write_html("report.html", structures, scores)   # or scores.to_html(path, structures)
  cryknn predict --html=report.html PATH ...

The page needs no network: the 3D viewer (3Dmol.js, BSD-3-Clause, shipped in
`report_assets/` with its licence) is inlined once, and the structures follow as one compact
JSON block (Cartesian coordinates to 0.001 A, one element index and one site index per
atom, one row per site). It lists the structures (sortable by plausibility and flag counts);
the chosen one (`report.html#N` opens the N-th) is drawn in 3D, its unit cell boxed, with
implausible sites in red and sites outside the model's domain in orange, each labelled, and
its sites table sorts by any column, p(given) included.

A site's flag is the score's own `flag` where it has one ('implausible', 'outside_domain'
or ''); otherwise a site whose element the model does not model is outside the domain and
one whose p(given) is below `threshold` is implausible.
"""

from __future__ import annotations

import collections
import functools
import html
import json
import os
import re
from typing import Sequence

import numpy as np

from cryknn import cif
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import util

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_assets")
VIEWER_JS = "3Dmol-min.js"
VIEWER_LICENCE = "3Dmol-LICENSE.txt"
VIEWER_VERSION = "2.5.5"
FLAGS = ("implausible", "outside_domain", "")
DEFAULT_THRESHOLD = 0.05
COORDINATE_DECIMALS = 3  # angstrom: 0.001 A is far below what a view can show
P_DECIMALS = 4


def site_flag(site, threshold: float = DEFAULT_THRESHOLD) -> str:
    """'implausible', 'outside_domain' or '': the site's own flag where the scores carry
    one, else outside the domain for an element the model does not model (p_given None)
    and implausible for p(given) < threshold."""
    flag = getattr(site, "flag", None)
    if flag is not None:
        flag = str(flag)
        if flag not in FLAGS:
            raise ValueError(f"unknown site flag {flag!r}; expected one of {FLAGS}")
        return flag
    if site.p_given is None:
        return "outside_domain"
    return "implausible" if site.p_given < threshold else ""


def paired(structures: Sequence[cif.Structure], scores: Sequence) -> list:
    """(structure or None, score) for every score, in order: each score takes the first
    structure with its id not taken yet (scores may lack skipped structures; ids repeat
    when two files share a name)."""
    waiting = collections.defaultdict(collections.deque)
    for s in structures:
        waiting[s.id].append(s)
    return [(waiting[score.structure_id].popleft() if waiting[score.structure_id] else None,
             score) for score in scores]


def _p(value: float | None) -> float | None:
    return None if value is None else round(float(value), P_DECIMALS)


def _atom_sites(s: cif.Structure, score) -> list[int]:
    """Per unit-cell atom: the index of its row in score.sites (a site, or per-atom rows)."""
    per_atom = any(t.atom_index is not None for t in score.sites)
    row_of = {(t.atom_index if per_atom else t.site_row - 1): r
              for r, t in enumerate(score.sites)}
    keys = range(s.num_atoms) if per_atom else (int(i) for i in s.site_index)
    try:
        return [row_of[key] for key in keys]
    except KeyError:
        raise errors.DataError(f"the scores of {score.structure_id} do not fit its structure "
                               f"({s.num_atoms} atoms, {len(score.sites)} score rows): pass "
                               f"the structures that were scored") from None


def _geometry(s: cif.Structure, score) -> dict:
    symbols = [elements_lib.symbol(int(z)) for z in s.numbers]
    unique = sorted(set(symbols))
    index = {symbol: i for i, symbol in enumerate(unique)}
    return {"cell": np.round(s.lattice, 4).ravel().tolist(), "elements": unique,
            "z": [index[symbol] for symbol in symbols],
            "xyz": np.round(s.cart, COORDINATE_DECIMALS).ravel().tolist(),
            "site": _atom_sites(s, score)}


def structure_record(s: cif.Structure | None, score,
                     threshold: float = DEFAULT_THRESHOLD) -> dict:
    """One structure as the page's JSON: its score, its sites
    ([label, given, predicted, p_predicted, p_given, multiplicity, flag, top 3]) and, when
    the structure is known, its atoms (see report_assets/report.js)."""
    flags = [site_flag(t, threshold) for t in score.sites]
    rows = [[t.site_label, t.given, t.predicted, _p(t.p_predicted), _p(t.p_given),
             int(t.multiplicity), flag, " ".join(f"{e}:{p:.3f}" for e, p in t.top)]
            for t, flag in zip(score.sites, flags)]
    record = {"id": score.structure_id, "plausibility": _p(score.plausibility),
              "modelled": int(score.modelled_atoms), "atoms": int(score.num_atoms),
              "warnings": [str(w) for w in score.warnings],
              "counts": {flag: flags.count(flag) for flag in FLAGS if flag}, "sites": rows}
    if s is not None:
        record.update(_geometry(s, score))
    return record


@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        return f.read()


def _script_safe(text: str) -> str:
    """JSON for inside a <script> element: no '<', '>' or '&' that could end it."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(records: Sequence[dict], *, threshold: float = DEFAULT_THRESHOLD,
           model: str = "a cryknn model", title: str | None = None,
           rule: str | None = None) -> str:
    """The page (text) of structure records (`structure_record`); rule: what made a site
    implausible (`CheckRule.describe`; default p(given) < threshold)."""
    from cryknn import __version__

    title = title or f"cryknn report: {len(records)} structure{'' if len(records) == 1 else 's'}"
    data = {"model": model, "threshold": threshold,
            "rule": rule or f"p(given) < {threshold:.3g}", "structures": list(records)}
    values = {
        "TITLE": html.escape(title), "VERSION": html.escape(__version__),
        "CSS": _asset("report.css"), "VIEWER_JS": _asset(VIEWER_JS),
        "VIEWER_VERSION": VIEWER_VERSION, "VIEWER_LICENCE": html.escape(_asset(VIEWER_LICENCE)),
        "DATA": _script_safe(json.dumps(data, separators=(",", ":"), allow_nan=False,
                                        ensure_ascii=False)),
        "REPORT_JS": _asset("report.js"),
    }
    # One pass, so that nothing substituted (a structure id, say) is substituted again.
    return re.sub(r"@@([A-Z_]+)@@", lambda m: values[m.group(1)], _asset("page.html"))


def write_html(path: str | os.PathLike, structures, scores: Sequence, *,
               threshold: float = DEFAULT_THRESHOLD, model=None,
               title: str | None = None, rule: str | None = None) -> int:
    """Writes the report of `scores` (a Scores, or StructureScores) of `structures` (one or
    a list: Structures, ase.Atoms or pymatgen Structures; those without a score are left
    out) to `path`, atomically. model: the scoring Model or its description; rule: the
    checking rule that flagged the sites, as text (default p(given) < threshold). Returns
    the number of structures in the report."""
    util.check_output_path(path)
    if not 0 < threshold < 1:
        raise errors.ConfigError(f"threshold must be in (0, 1), got {threshold}")
    found = cif.as_structures(structures) if structures is not None else []
    records = [structure_record(s, score, threshold) for s, score in paired(found, scores)]
    describe = getattr(model, "describe", None)
    text = render(records, threshold=threshold, title=title, rule=rule,
                  model=(describe() if describe else model or "a cryknn model").splitlines()[0])
    with util.atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return len(records)
