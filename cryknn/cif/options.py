"""Reading policies (`ReadOptions`: isotopes, disorder, merge tolerances), what the
policies removed (`RemovalCounter`) and skip reasons counted by kind."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryknn import errors

if TYPE_CHECKING:
    from cryknn.cif.structure import Structure

DISORDER_POLICIES = ("majority", "drop", "all")


def skip_reason_kind(reason: str) -> str:
    """A skip reason without its specifics (quoted values, numbers), for counting."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    kind = re.sub(r"\d+(\.\d+)?", "N", kind)
    return kind[:120]


def summarize_skips(reasons: Iterable[str], top: int = 12) -> list[str]:
    """Console lines counting skips per kind of reason, most common first."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = skip_reason_kind(reason)
        counts[kind] = counts.get(kind, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    lines = [f"  {n:7d}  {kind}" for kind, n in ranked[:top]]
    if len(ranked) > top:
        rest = sum(n for _, n in ranked[top:])
        lines.append(f"  {rest:7d}  ({len(ranked) - top} other reasons)")
    return lines


POLICY_REMOVALS = {"duplicates_merged": "duplicate atoms merged (merge_duplicates)",
                   "disorder_dropped": "disorder alternatives dropped (disorder='majority')"}


class RemovalCounter:
    """Atoms the reading policies removed, summed over structures, per policy."""

    def __init__(self):
        self.atoms = dict.fromkeys(POLICY_REMOVALS, 0)
        self.structures = dict.fromkeys(POLICY_REMOVALS, 0)

    def add(self, structure: "Structure") -> None:
        for policy, n in structure.removed.items():
            self.atoms[policy] += n
            self.structures[policy] += n > 0

    def lines(self) -> list[str]:
        """'  N  <what> in M structures' per policy that removed anything."""
        return [f"  {self.atoms[p]:7d}  {what} in {self.structures[p]} "
                f"structure{'s' if self.structures[p] != 1 else ''}"
                for p, what in POLICY_REMOVALS.items() if self.atoms[p]]


def _option(default, help_text: str):
    """A ReadOptions field; its help becomes the command-line flag's help."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How CIF content is turned into `Structure`s (all policies in one place).

    Attributes:
      isotopes_as_hydrogen: read deuterium 'D' and tritium 'T' sites as hydrogen (Z=1).
        When False a structure with such a site is skipped with the reason
        "hydrogen isotope ...".
      disorder: what to do with partially occupied sites and disorder groups.
        "majority" (default) keeps one ordered assembly, the one found in most unit cells:
          1. Sites in a disorder group (`_atom_site_disorder_group` other than '.', '?',
             '0' and not negative) compete per `_atom_site_disorder_assembly` (all one
             assembly when that column is absent): the group with the highest mean
             occupancy is kept (ties: the group listed first), the other groups dropped.
             A group alone in its assembly has unlabelled alternatives and goes to rule 2.
          2. Every other site with occupancy < 1 - occupancy_tolerance (including
             SHELX negative groups, whose alternatives are symmetry copies) is resolved
             after symmetry expansion. Atoms closer than `overlap_tolerance`, at least
             one of them such a partial atom, are alternatives for one place; connected
             alternatives form a cluster. A cluster holding a fully occupied (or rule-1
             kept) atom keeps only those: a partial atom cannot sit next to an atom that
             is always there. Otherwise the cluster keeps its highest-occupancy atom
             (ties: first listed) when its occupancies sum to >= 0.5 (the place is
             occupied in most cells), else nothing. So an isolated 0.3-occupancy water
             is dropped, a 0.5/0.5 Fe/Mg mixed site keeps Fe, a 0.6/0.4 split position
             keeps the 0.6 atom, a site on a mirror split into two 0.5 copies 0.5 A
             apart keeps one.
          Known limits: orientational disorder over more than two positions (e.g. an
          SO4 over three orientations at 1/3 each, alternatives further apart than
          overlap_tolerance) loses those atoms; occupancies written in the old
          crystallographic convention (divided by the site multiplicity, e.g. 0.25 on a
          4-fold axis) are taken at face value.
        "drop": skip every structure with a partially occupied site or a disorder group.
        "all": keep every site as given (occupancies stay in `Structure.occupancies`).
      merge_tolerance: angstrom. Symmetry copies of one site closer than this are one atom
        (atoms on special positions). 0.4 is gemmi's own value. Must stay below half
        the smallest interplanar spacing of the cell (always true for real crystals).
      merge_duplicates: atoms of the same element closer than merge_tolerance whose
        occupancies add up to more than 1 (+ occupancy_tolerance) are one atom even when
        they come from different sites (the first listed is kept): sites listed twice,
        x=0 and x=1 copies written by P1 exporters, leftover duplicates (about 3% of
        CoRE MOF 2019-ASR structures have such pairs). Partial alternatives that add up
        to <= 1 and atoms of different elements are left to `disorder`.
      overlap_tolerance: angstrom. Under "majority", partially occupied atoms closer than
        this are alternatives for one place (0.7 is below any real bond length except
        in H2).
      occupancy_tolerance: an occupancy >= 1 - occupancy_tolerance counts as full.

    Unknown element types (X, ?, Q, Du, centroids 'Cg', sites flagged
    `_atom_site_calc_flag dum`) always skip the structure with a reason.
    A block with no symmetry information at all (no operations, no Hall, H-M or
    number) is read as P1, as gemmi and most readers do; a block whose symmetry is given
    but cannot be understood is skipped.
    Missing or null ('?', '.') occupancies count as 1.
    """

    isotopes_as_hydrogen: bool = _option(
        True, "Read deuterium and tritium as hydrogen (--noisotopes_as_hydrogen skips them).")
    disorder: str = _option(
        "majority", "Partial occupancy and disorder groups: majority (keep the most "
        "occupied alternative), drop (skip such structures) or all (keep every site).")
    merge_tolerance: float = _option(
        0.4, "Angstrom: symmetry copies of one site closer than this are one atom.")
    merge_duplicates: bool = _option(
        True, "Merge same-element atoms closer than merge_tolerance whose occupancies add "
        "up to more than 1 (--nomerge_duplicates keeps every listed site).")
    overlap_tolerance: float = _option(
        0.7, "Angstrom: under --disorder=majority, partial atoms closer than this are "
        "alternatives for one place.")
    occupancy_tolerance: float = _option(
        0.01, "An occupancy >= 1 - this counts as full.")

    def __post_init__(self):
        if self.disorder not in DISORDER_POLICIES:
            raise errors.ConfigError(
                f"disorder must be one of {', '.join(DISORDER_POLICIES)}, got {self.disorder!r}")
        for field in ("merge_tolerance", "overlap_tolerance", "occupancy_tolerance"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise errors.ConfigError(f"{field} must be a finite number >= 0, got {value!r}")
        if self.occupancy_tolerance >= 0.5:
            raise errors.ConfigError("occupancy_tolerance must be < 0.5")


