"""Crystal structure records and CIF reading.

A `Structure` is a periodic point set: a lattice plus a motif of typed atoms in
fractional coordinates. Readers return structures together with `Skip` records
(file, block, reason) for everything they could not read, so nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import sqlite3
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import gemmi
import numpy as np
from gemmi import cif

from cryknn import elements
from cryknn import errors
from cryknn import geometry
from cryknn import util


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    """One crystal, expanded to its full unit cell.

    Attributes:
      id: `<file name without extension>:<CIF data block name>`.
      source: where it was read from (a path, or `archive.tar.xz!member.cif`).
      lattice: (3, 3) float64, rows are the cell vectors a, b, c in angstrom.
      frac: (N, 3) float64 fractional coordinates, wrapped into [0, 1).
      numbers: (N,) int32 atomic numbers (1..118).
      labels: (N,) str site labels (symmetry copies keep their parent's label).
      occupancies: (N,) float32 site occupancies.
      site_index: (N,) int32 the site each atom stands for: its row in the CIF's atom-site
        loop (symmetry copies share their row). Default: one site per atom.
      removed: atoms the reading policies took out, by policy ('duplicates_merged',
        'disorder_dropped'); empty when none (see ReadOptions).
      notes: what the reader had to guess (elements read from site labels), one line each.

    `len(s)` is the number of atoms; `repr(s)` one short line.
    """

    id: str
    source: str
    lattice: np.ndarray
    frac: np.ndarray
    numbers: np.ndarray
    labels: np.ndarray
    occupancies: np.ndarray
    site_index: np.ndarray | None = None
    removed: dict = dataclasses.field(default_factory=dict)
    notes: tuple = ()

    def __len__(self) -> int:
        return self.num_atoms

    def __repr__(self) -> str:
        lengths = " ".join(f"{x:.3g}" for x in np.linalg.norm(self.lattice, axis=1))
        return (f"Structure(id={self.id!r}, formula={self.formula!r}, atoms={self.num_atoms}, "
                f"sites={self.num_sites}, cell=[{lengths}] A)")

    @property
    def formula(self) -> str:
        """Unit-cell formula, elements in order of first appearance ('C4H8O')."""
        z, first, count = np.unique(self.numbers, return_index=True, return_counts=True)
        return "".join(elements.symbol(int(z[i])) + (str(count[i]) if count[i] > 1 else "")
                       for i in np.argsort(first))

    def __post_init__(self):
        if self.site_index is None:
            object.__setattr__(self, "site_index", np.arange(self.num_atoms, dtype=np.int32))

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def num_sites(self) -> int:
        """Distinct sites (CIF atom-site rows) among the atoms."""
        return int(np.unique(self.site_index).size)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def cart(self) -> np.ndarray:
        """(N, 3) float64 Cartesian coordinates in angstrom."""
        return self.frac @ self.lattice

    @classmethod
    def from_arrays(cls, lattice, frac, numbers, id: str = "structure:structure",
                    source: str = "") -> "Structure":
        """A structure with one site per atom, labels like 'C1', 'C2', 'H1'."""
        lattice = np.asarray(lattice, np.float64).reshape(3, 3)
        numbers = np.asarray(numbers, np.int32).reshape(-1)
        frac = np.asarray(frac, np.float64).reshape(len(numbers), 3)
        if numbers.size and (numbers.min() < 1 or numbers.max() > elements.NUM_ELEMENTS):
            raise errors.DataFormatError(f"{id}: atomic numbers outside 1..118")
        if np.any(np.abs(frac) > MAX_FRACTIONAL):
            raise errors.DataFormatError(f"{id}: fractional coordinates beyond "
                                         f"+-{MAX_FRACTIONAL:g}")
        return cls(id=id, source=source or id, lattice=lattice, frac=_wrap(frac),
                   numbers=numbers, labels=_site_labels(numbers),
                   occupancies=np.ones(len(numbers), np.float32))

    @classmethod
    def from_ase(cls, atoms, id: str | None = None) -> "Structure":
        """From an ase.Atoms with a periodic 3-D cell (one site per atom)."""
        if not all(atoms.pbc) or atoms.cell.rank != 3:
            raise errors.DataFormatError("ase.Atoms must be periodic in 3 dimensions with a "
                                         "full cell")
        name = id or f"{atoms.get_chemical_formula()}:{atoms.get_chemical_formula()}"
        return cls.from_arrays(atoms.cell.array, atoms.get_scaled_positions(wrap=True),
                               atoms.numbers, id=name)

    @classmethod
    def from_pymatgen(cls, structure, id: str | None = None) -> "Structure":
        """From an ordered pymatgen Structure (one site per atom)."""
        if not structure.is_ordered:
            raise errors.DataFormatError("pymatgen structure has partially occupied sites; "
                                         "order it first")
        name = id or f"{structure.formula.replace(' ', '')}:{structure.formula.replace(' ', '')}"
        return cls.from_arrays(structure.lattice.matrix, structure.frac_coords,
                               [site.specie.Z for site in structure], id=name)

    def to_pymatgen(self):
        """This structure as a pymatgen Structure (needs pymatgen: pip install pymatgen);
        the site labels and occupancies are kept as site properties."""
        try:
            from pymatgen.core import Lattice, Structure as PymatgenStructure
        except ImportError:
            raise errors.MissingExtraError("Structure.to_pymatgen needs pymatgen: "
                                           "pip install pymatgen") from None
        return PymatgenStructure(
            Lattice(self.lattice), [elements.symbol(int(z)) for z in self.numbers], self.frac,
            site_properties={"label": [str(x) for x in self.labels],
                             "occupancy": self.occupancies.astype(float).tolist()})

    def to_ase(self):
        """This structure as an ase.Atoms (needs ase: pip install 'cryknn[ase]')."""
        ase = _import_ase()
        return ase.Atoms(numbers=self.numbers, cell=self.lattice, scaled_positions=self.frac,
                         pbc=True)


def as_structure(obj) -> Structure:
    """A Structure from a Structure, an ase.Atoms or a pymatgen Structure."""
    if isinstance(obj, Structure):
        return obj
    if hasattr(obj, "get_scaled_positions") and hasattr(obj, "pbc"):  # ase.Atoms
        return Structure.from_ase(obj)
    if hasattr(obj, "frac_coords") and hasattr(obj, "lattice"):  # pymatgen Structure
        return Structure.from_pymatgen(obj)
    raise errors.DataFormatError(f"expected a cryknn Structure, an ase.Atoms or a pymatgen "
                                 f"Structure (or a list of them), got {type(obj).__name__}")


def as_structures(x) -> list[Structure]:
    """A list of Structures from one structure (any kind as_structure takes) or many."""
    if isinstance(x, (str, bytes, os.PathLike)):
        raise errors.DataFormatError("got a path: read it first with cryknn.read(path)")
    if is_single(x):
        return [as_structure(x)]
    return [as_structure(item) for item in x]


def is_single(x) -> bool:
    """Whether x is one structure (a Structure, ase.Atoms, pymatgen Structure), not a list."""
    return (isinstance(x, Structure) or not isinstance(x, Iterable) or hasattr(x, "pbc")
            or hasattr(x, "frac_coords"))


def _import_ase():
    try:
        import ase
    except ImportError:
        raise errors.UserError("this needs ase: pip install 'cryknn[ase]'") from None
    return ase


@dataclasses.dataclass(frozen=True)
class Skip:
    """A file or data block that was not read, and why (one line, human readable)."""

    file: str
    block: str
    reason: str


# --------------------------------------------------------------------------------------
# Reading options and errors
# --------------------------------------------------------------------------------------

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


class _BlockSkip(Exception):
    """Internal: this data block is not read; the message is the reason."""


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

_NULLS = ("?", ".")
_QUOTES = ("'", '"', ";")


def _unquote(values) -> list[str]:
    """Raw CIF values -> strings without quotes (most values are unquoted: fast path)."""
    as_string = cif.as_string
    return [as_string(v) if v[:1] in _QUOTES else v for v in values]


def _number(value: str) -> float:
    """One raw CIF value -> float: '0.123(4)' -> 0.123, '1/4' -> 0.25, else NaN."""
    number = cif.as_number(cif.as_string(value))
    if math.isnan(number) and "/" in value:
        numerator, _, denominator = value.partition("/")
        try:
            number = float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError):
            pass
    return number


def _floats(values: list[str]) -> np.ndarray:
    """Raw CIF values -> float64 array (see `_number`); '?', '.', junk -> NaN."""
    try:
        return np.array(list(map(float, values)), dtype=np.float64)
    except ValueError:
        return np.array([_number(v) for v in values], dtype=np.float64)


def _wrap(frac: np.ndarray) -> np.ndarray:
    """Fractional coordinates (..., 3) wrapped into [0, 1) (a new array)."""
    frac = frac - np.floor(frac)
    frac[frac >= 1.0] = 0.0  # -1e-17 - floor(-1e-17) rounds to 1.0
    return frac


def _pair_distances_sq(x: np.ndarray, y: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Squared minimum-image distances between fractional points (..., 3) and (..., 3).

    Rounding the fractional difference finds the nearest image for every pair closer
    than half the smallest interplanar spacing, which is all the callers ask about.
    """
    d = x - y
    d -= np.rint(d)
    cart = d @ lattice
    return np.einsum("...i,...i->...", cart, cart)


def _subset(keep: np.ndarray, i: np.ndarray, j: np.ndarray, d2: np.ndarray):
    """Pairs (i, j, d2) among the atoms in keep (N,), renumbered to the kept atoms."""
    new_index = np.cumsum(keep) - 1
    both = keep[i] & keep[j]
    return new_index[i[both]], new_index[j[both]], d2[both]


# Pairs the close-pair search compares at most (~100 bytes each); real cells of a million
# atoms need ~10^7. Only piles of coincident atoms reach it (the search is quadratic in the
# atoms of one place).
MAX_PAIR_CANDIDATES = 2**24
# Atoms a unit cell may have after symmetry expansion (the largest real cells: ~10^5).
MAX_ATOMS = 2**21


def _crowded_reason(crowd: int, cutoff: float, total: int) -> str:
    return (f"coincident sites: up to {crowd} atoms within {cutoff:g} A of one place; "
            f"resolving them would compare {total} pairs (limit {MAX_PAIR_CANDIDATES})")


def _close_pairs(frac: np.ndarray, lattice: np.ndarray, cutoff: float,
                 spacing: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of atoms closer than cutoff (minimum image), by a cell list.

    Args:
      frac: (N, 3) fractional coordinates in [0, 1).
      lattice: (3, 3) rows are cell vectors.
      cutoff: angstrom, below half the smallest interplanar spacing.
      spacing: (3,) interplanar spacings of the lattice, if already known.
    Returns:
      i, j (P,) int64 with i < j, and d2 (P,) squared distances, sorted by (i, j).
    """
    n = frac.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if n < 2 or cutoff <= 0:
        return empty, empty, np.zeros(0)
    if spacing is None:
        spacing = geometry.interplanar_spacings(lattice)
    # Bins at least cutoff wide (in interplanar terms), so a close pair lies in the same
    # or adjacent bins; no more bins than about 2 per atom, so a dense table is cheap.
    bins = np.maximum(np.floor(spacing / cutoff), 1.0)
    excess = np.prod(bins) / max(2 * n, 27)
    if excess > 1:
        bins = np.maximum(np.floor(bins / excess ** (1 / 3)), 1.0)
    bins = bins.astype(np.int64)
    cell = np.minimum((frac * bins).astype(np.int64), bins - 1)  # (N, 3)
    strides = np.array([bins[1] * bins[2], bins[2], 1], dtype=np.int64)
    key = cell @ strides
    order = np.argsort(key, kind="stable")
    bin_count = np.bincount(key, minlength=int(np.prod(bins)))
    bin_start = np.cumsum(bin_count) - bin_count
    if np.all(bins >= 3):
        # Half shell: the own bin (pairs i < j) and 13 forward neighbours (all pairs).
        shell = np.array([o for o in itertools.product((-1, 0, 1), repeat=3)
                          if o > (0, 0, 0)] + [(0, 0, 0)], dtype=np.int64)
    else:
        # Few bins: every distinct neighbour bin (offsets modulo bins), pairs i < j.
        axis = [np.unique(np.array([-1, 0, 1]) % b) for b in bins.tolist()]
        shell = np.array(list(itertools.product(*axis)), dtype=np.int64)
    neighbour = ((cell[:, None, :] + shell[None, :, :]) % bins) @ strides  # (N, K)
    count = bin_count[neighbour].ravel()
    start = bin_start[neighbour].ravel()
    total = int(count.sum())
    if total > MAX_PAIR_CANDIDATES:
        raise _BlockSkip(_crowded_reason(int(bin_count.max()), cutoff, total))
    i = np.repeat(np.repeat(np.arange(n), shell.shape[0]), count)
    j = order[np.repeat(start - np.cumsum(count) + count, count) + np.arange(total)]
    if np.all(bins >= 3):
        own = np.repeat(np.tile(np.all(shell == 0, axis=1), n), count)
        pick = ~own | (i < j)
    else:
        pick = i < j
    i, j = i[pick], j[pick]
    swap = i > j
    i, j = np.where(swap, j, i), np.where(swap, i, j)
    d2 = _pair_distances_sq(frac[i], frac[j], lattice)
    close = np.flatnonzero(d2 < cutoff * cutoff)
    close = close[np.lexsort((j[close], i[close]))]
    return i[close], j[close], d2[close]


def _first_value(block, tags) -> str | None:
    """The first non-null value of the first present tag, unquoted."""
    for tag in tags:
        value = block.find_value(tag)
        if value is not None:
            value = cif.as_string(value).strip()
            return None if value in _NULLS or not value else value
    return None


# --------------------------------------------------------------------------------------
# Unit cell
# --------------------------------------------------------------------------------------

_CELL_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
              "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")


CELL_LENGTH_RANGE = geometry.CELL_LENGTH_RANGE
# |fractional coordinate| read: beyond this, float64 keeps no digit of the position in
# the cell (1e300 - floor(1e300) is 0), and no writer means a position 10^6 cells away.
MAX_FRACTIONAL = 1e6


def _cell(block) -> tuple[np.ndarray, gemmi.UnitCell]:
    """(3, 3) lattice with rows a, b, c in angstrom (cart = frac @ lattice), and the cell."""
    raw = [block.find_value(tag) for tag in _CELL_TAGS]
    missing = [tag for tag, value in zip(_CELL_TAGS, raw) if value is None]
    if len(missing) == 6:
        raise _BlockSkip("no unit cell (no _cell_length_* / _cell_angle_* items)")
    if missing:
        raise _BlockSkip(f"incomplete unit cell: missing {', '.join(missing)}")
    params = []
    for tag, value in zip(_CELL_TAGS, raw):
        number = cif.as_number(cif.as_string(value))
        if not math.isfinite(number):
            raise _BlockSkip(f"unit cell {tag} is not a number ({value!r})")
        params.append(number)
    for tag, length in zip(_CELL_TAGS[:3], params[:3]):
        if length <= 0:
            raise _BlockSkip(f"non-positive cell length {tag} = {length:g}")
        if not CELL_LENGTH_RANGE[0] <= length <= CELL_LENGTH_RANGE[1]:
            raise _BlockSkip(f"cell length {tag} = {length:g} A outside "
                             f"{CELL_LENGTH_RANGE[0]:g} .. {CELL_LENGTH_RANGE[1]:g} A (float32 "
                             f"distances would underflow to 0 or overflow)")
    for tag, angle in zip(_CELL_TAGS[3:], params[3:]):
        if not 0 < angle < 180:
            raise _BlockSkip(f"cell angle {tag} = {angle:g} outside (0, 180)")
    cell = gemmi.UnitCell(*params)
    volume = cell.volume
    a, b, c = params[:3]
    if not (math.isfinite(volume) and volume > 1e-6 * a * b * c):
        raise _BlockSkip(
            "cell angles {:g}, {:g}, {:g} give no positive volume".format(*params[3:]))
    lattice = np.array(cell.orth.mat, dtype=np.float64).T
    return lattice, cell


# --------------------------------------------------------------------------------------
# Symmetry
# --------------------------------------------------------------------------------------

_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz")
_HALL_TAGS = ("_space_group_name_Hall", "_symmetry_space_group_name_Hall")
_HM_TAGS = ("_space_group_name_H-M_alt", "_symmetry_space_group_name_H-M")
_NUMBER_TAGS = ("_space_group_IT_number", "_symmetry_Int_Tables_number")
_DEN = 24  # gemmi.Op.DEN: rotations and translations are integers over 24
_MAX_OPS = 192


def _op_keys(rot: np.ndarray, tran: np.ndarray) -> np.ndarray:
    """One int64 per operation: integer rotation entries (-8..7, 4 bits each) and
    translations in 1/24 modulo 1 (5 bits each)."""
    digits = np.concatenate([rot.reshape(-1, 9) + 8, tran.reshape(-1, 3) % _DEN], axis=1)
    weights = np.array([16 ** k for k in range(9)] + [16 ** 9 * 32 ** k for k in range(3)],
                       dtype=np.float64)
    return np.rint(digits.astype(np.float64) @ weights).astype(np.int64)  # < 2**51: exact


def _as_group(ops: list[gemmi.Op]) -> tuple[np.ndarray, np.ndarray]:
    """gemmi ops -> read-only (rot (M, 3, 3), tran (M, 3)) float64, identity first.

    Duplicates (equal modulo lattice translations) are removed; the list must be a
    group modulo lattice translations, else ValueError.
    """
    rot24 = np.array([op.rot for op in ops], dtype=np.int64).reshape(-1, 3, 3)
    if np.any(rot24 % _DEN):
        raise ValueError("an operation has a non-integer rotation part")
    rot = rot24 // _DEN
    tran = np.array([op.tran for op in ops], dtype=np.int64).reshape(-1, 3) % _DEN
    if np.any(np.abs(rot) > 7):
        raise ValueError("an operation has a rotation entry beyond +-7")
    dets = np.round(np.linalg.det(rot.astype(np.float64))).astype(int)
    if not np.all(np.abs(dets) == 1):
        raise ValueError("an operation is not a rotation (determinant not +-1)")
    keys = _op_keys(rot, tran)
    _, first = np.unique(keys, return_index=True)
    first.sort()
    rot, tran, keys = rot[first], tran[first], keys[first]
    identity = keys == _op_keys(np.eye(3, dtype=np.int64)[None], np.zeros((1, 3), np.int64))[0]
    if not identity.any():
        raise ValueError("the identity operation x,y,z is missing")
    order = np.argsort(~identity, kind="stable")
    rot, tran = rot[order], tran[order]
    if len(rot) > _MAX_OPS:
        raise ValueError(f"{len(rot)} distinct operations (a space group has at most 192)")
    # Closure: every product R_i (R_j x + t_j) + t_i must be in the list.
    m = len(rot)
    rot_f = rot.astype(np.float64)
    # (M*3, 3) @ (3, M*3) in one BLAS call: [i, a, j, c] = sum_b R_i[a, b] R_j[b, c]
    prod_rot = (rot_f.reshape(m * 3, 3) @ rot_f.transpose(1, 0, 2).reshape(3, m * 3))
    prod_rot = np.rint(prod_rot).astype(np.int64).reshape(m, 3, m, 3).transpose(0, 2, 1, 3)
    prod_tran = np.rint(rot_f.reshape(m * 3, 3) @ tran.T.astype(np.float64)).astype(np.int64)
    prod_tran = prod_tran.reshape(m, 3, m).transpose(0, 2, 1) + tran[:, None, :]
    if np.any(np.abs(prod_rot) > 7) or not np.all(np.isin(_op_keys(prod_rot, prod_tran), keys)):
        raise ValueError(f"the {len(rot)} operations are not closed under composition")
    tran_f = tran.astype(np.float64) / _DEN
    rot_f.flags.writeable = False
    tran_f.flags.writeable = False
    return rot_f, tran_f


@functools.lru_cache(maxsize=4096)
def _ops_from_triplets(triplets: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    ops = []
    for triplet in triplets:
        try:
            ops.append(gemmi.Op(triplet))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"bad operation {triplet!r} ({err})") from None
    return _as_group(ops)


@functools.lru_cache(maxsize=1024)
def _ops_from_hall(hall: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _as_group(list(gemmi.symops_from_hall(hall)))
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"Hall symbol {hall!r} not understood ({err})") from None


def _hm_variants(hm: str) -> Iterator[str]:
    """The H-M symbol as written, then with common typing variants undone:
    'P2_1/n' and 'P2(1)/c' (subscripts) -> 'P21/n', 'P21/c'; 'P 21 /m' -> 'P 21/m'."""
    yield hm
    fixed = re.sub(r"(\d)\((\d)\)", r"\1\2", hm.replace("_", ""))
    fixed = re.sub(r"\s*/\s*", "/", fixed)
    if fixed != hm:
        yield fixed


@functools.lru_cache(maxsize=1024)
def _ops_from_hm(hm: str, alpha: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    sg = None
    for variant in _hm_variants(hm):
        try:
            sg = gemmi.find_spacegroup_by_name(variant, alpha, gamma, "2")
        except (RuntimeError, ValueError):
            sg = None
        if sg is not None:
            break
    if sg is None:
        raise ValueError(f"H-M symbol {hm!r} not found in gemmi's table")
    return _as_group(list(sg.operations()))


@functools.lru_cache(maxsize=256)
def _ops_from_number(number: int) -> tuple[np.ndarray, np.ndarray]:
    sg = gemmi.find_spacegroup_by_number(number) if 1 <= number <= 230 else None
    if sg is None:
        raise ValueError(f"space group number {number} not in 1..230")
    return _as_group(list(sg.operations()))


_P1 = _ops_from_triplets(("x,y,z",))


def _symmetry(block, cell: gemmi.UnitCell) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry operations of a block: (rot (M, 3, 3), tran (M, 3)), identity first.

    Sources in order: the listed operations, the Hall symbol, the H-M symbol (origin
    choice 2 preferred, as gemmi does); the IT number only when none of those is given.
    No symmetry information at all means P1.
    """
    problems = []
    for tag in _SYMOP_TAGS:
        column = block.find_values(tag)
        if column:
            triplets = tuple(t.strip() for t in _unquote(column) if t.strip() not in _NULLS)
            if triplets:
                try:
                    return _ops_from_triplets(triplets)
                except ValueError as err:
                    problems.append(f"symmetry operations: {err}")
            break
    hall = _first_value(block, _HALL_TAGS)
    if hall:
        try:
            return _ops_from_hall(hall)
        except ValueError as err:
            problems.append(str(err))
    hm = _first_value(block, _HM_TAGS)
    if hm:
        try:
            return _ops_from_hm(hm, cell.alpha, cell.gamma)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise _BlockSkip("unrecognised space group: " + "; ".join(problems))
    number = _first_value(block, _NUMBER_TAGS)
    if number:
        try:
            return _ops_from_number(int(number))
        except ValueError as err:
            raise _BlockSkip(f"unrecognised space group: {err}") from None
    return _P1


def _greedy_keep(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Keep mask (n,): walking atoms in index order, an atom is dropped when it is
    paired (i < j) with an earlier atom that is kept (gemmi's merging rule).

    Evaluated by fixed-point iteration: after t rounds every atom at depth < t in the
    pair graph is final, and cliques of coinciding copies settle in two rounds.
    """
    keep = np.ones(n, dtype=bool)
    while i.size:
        dropped = np.zeros(n, dtype=bool)
        dropped[j[keep[i]]] = True
        if np.array_equal(~dropped, keep):
            break
        keep = ~dropped
    return keep


def _symmetry_images(frac: np.ndarray, rot: np.ndarray, tran: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """All symmetry copies of the sites, wrapped into [0, 1), in site then operation
    order; copies on exact special positions (equal to rounding error) appear once.

    Args:
      frac: (S, 3) fractional coordinates of the asymmetric-unit sites.
      rot, tran: (M, 3, 3), (M, 3) operations, identity first.
    Returns:
      frac (N, 3), parent (N,) index of the site each copy comes from.
    """
    num_sites, num_ops = frac.shape[0], rot.shape[0]
    if num_sites * num_ops > MAX_ATOMS:
        raise _BlockSkip(f"too many atoms: {num_sites} sites x {num_ops} symmetry operations "
                         f"= {num_sites * num_ops} atoms (limit {MAX_ATOMS})")
    if num_ops == 1:
        return _wrap(frac), np.arange(num_sites)
    images = _wrap(np.einsum("mij,nj->nmi", rot, frac) + tran).reshape(-1, 3)  # (S*M, 3)
    parent = np.repeat(np.arange(num_sites), num_ops)
    # Dropping a repeat of a site's earlier copy is what the tolerance merge would do
    # anyway; doing it exactly first keeps the distance search small.
    grid = np.rint(images * (1 << 20)).astype(np.int64) % (1 << 20)
    index = np.arange(images.shape[0])
    order = np.lexsort((index, grid[:, 2], grid[:, 1], grid[:, 0], parent))
    rows = np.column_stack([parent, grid])[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = np.any(rows[1:] != rows[:-1], axis=1)
    distinct = np.sort(order[first])
    return images[distinct], parent[distinct]


# --------------------------------------------------------------------------------------
# Disorder
# --------------------------------------------------------------------------------------

def _majority_groups(groups: list[str], assemblies: list[str] | None,
                     occ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sites kept / decided by disorder-group selection (policy "majority", rule 1).

    Returns (keep (S,) bool, decided (S,) bool): decided sites belong to a positive
    disorder group of an assembly with at least two groups; of those only the winning
    group of each assembly is kept. A lone group in its assembly is not decided here.
    """
    groups_arr = np.array(groups, dtype=object)
    positive = np.array([g not in _NULLS and g != "0" and not g.startswith("-")
                         for g in groups], dtype=bool)
    keep = np.ones(len(groups), dtype=bool)
    if not positive.any():
        return keep, positive
    asm = np.array(assemblies if assemblies is not None else [""] * len(groups), dtype=object)
    decided = np.zeros(len(groups), dtype=bool)
    for assembly in dict.fromkeys(asm[positive]):
        in_asm = positive & (asm == assembly)
        names = list(dict.fromkeys(groups_arr[in_asm]))  # order of first appearance
        if len(names) < 2:  # its alternatives are not labelled: leave it to rule 2
            continue
        decided |= in_asm
        means = [occ[in_asm & (groups_arr == g)].mean() for g in names]
        best = names[int(np.argmax(means))]  # argmax: first on ties
        keep &= ~(in_asm & (groups_arr != best))
    return keep, decided


def _majority_overlaps(occ: np.ndarray, candidates: np.ndarray, i: np.ndarray,
                       j: np.ndarray) -> np.ndarray:
    """Keep mask (N,) after resolving overlapping partial atoms (policy "majority", rule 2).

    Args:
      occ: (N,) occupancies; candidates: (N,) undecided partial atoms.
      i, j: pairs of atoms closer than the overlap tolerance, at least one a candidate.
    Pairs are alternatives for one place; connected alternatives form a cluster.
    Non-candidate atoms are always kept, and a cluster holding one keeps no candidate (a
    partial atom cannot sit next to an atom that is always there). Otherwise the cluster
    keeps its highest-occupancy candidate (first listed on ties) when the occupancies of
    its candidates sum to >= 0.5.
    """
    n = occ.shape[0]
    keep = ~candidates
    label = np.arange(n)
    while i.size:  # connected components by min-label propagation
        low = np.minimum(label[i], label[j])
        new = label.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    w = np.where(candidates, occ, 0.0).astype(np.float64)
    total = np.bincount(label, weights=w, minlength=n)
    anchored = np.bincount(label, weights=(~candidates).astype(np.float64), minlength=n) > 0
    cand = np.flatnonzero(candidates)
    order = cand[np.lexsort((cand, -w[cand], label[cand]))]  # per cluster: best first
    first = np.ones(order.size, dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    best = order[first]
    keep[best] = ~anchored[label[best]] & (total[label[best]] >= 0.5 - 1e-6)
    return keep


# --------------------------------------------------------------------------------------
# One data block
# --------------------------------------------------------------------------------------

_SITE_TAGS = ("fract_x", "?fract_y", "?fract_z", "?label", "?type_symbol", "?occupancy",
              "?disorder_group", "?disorder_assembly", "?calc_flag")
_X, _Y, _Z, _LABEL, _TYPE, _OCC, _GROUP, _ASSEMBLY, _CALC = range(len(_SITE_TAGS))

_element_cache: dict[tuple[str, bool], int | str] = {}


def _element(symbol: str, isotopes_as_hydrogen: bool) -> int | str:
    """Atomic number, or the skip reason for this type symbol (memoised)."""
    key = (symbol, isotopes_as_hydrogen)
    found = _element_cache.get(key)
    if found is None:
        try:
            found = elements.element_from_type_symbol(symbol, isotopes_as_hydrogen=True)
            if found == 1 and not isotopes_as_hydrogen and elements.is_hydrogen_isotope(symbol):
                found = f"hydrogen isotope {symbol!r} (isotopes_as_hydrogen=False)"
        except errors.UnknownElementError as e:
            found = f"unknown element type {symbol!r}"
            if "placeholder" in str(e):
                found += " (a placeholder name, not one of the 118 element symbols)"
        if len(_element_cache) < 100_000:
            _element_cache[key] = found
    return found


def _site_table(block):
    table = block.find("_atom_site_", list(_SITE_TAGS))
    if len(table) == 0:
        if block.find_values("_atom_site_Cartn_x"):
            raise _BlockSkip("atom sites have Cartesian coordinates only (no _atom_site_fract_x)")
        if block.find_values("_atom_site_label") or block.find_values("_atom_site_type_symbol"):
            raise _BlockSkip("atom sites have no fractional coordinates (_atom_site_fract_x)")
        raise _BlockSkip("no atom sites")
    for col, tag in ((_Y, "fract_y"), (_Z, "fract_z")):
        if not table.has_column(col):
            raise _BlockSkip(f"atom sites lack _atom_site_{tag}")
    return table


def _site_names(table) -> tuple[list[str], list[str]]:
    """(labels, element symbols) of the site rows; each falls back on the other."""
    labels = _unquote(table.column(_LABEL)) if table.has_column(_LABEL) else None
    types = _unquote(table.column(_TYPE)) if table.has_column(_TYPE) else None
    if types is None and labels is None:
        raise _BlockSkip("atom sites have neither _atom_site_type_symbol nor _atom_site_label")
    return (labels if labels is not None else types), (types if types is not None else labels)


def _atomic_numbers(table, labels: list[str], symbols: list[str],
                    options: ReadOptions) -> np.ndarray:
    """(S,) int32 element of each site row; dummy atoms and unknown types skip the block."""
    if table.has_column(_CALC):
        flags = [f.lower() for f in table.column(_CALC)]
        if "dum" in flags:
            site = labels[flags.index("dum")]
            raise _BlockSkip(f"dummy atom at site {site!r} (_atom_site_calc_flag dum)")
    unique, inverse = np.unique(np.array(symbols, dtype=str), return_inverse=True)
    z_unique = np.empty(len(unique), dtype=np.int32)
    for k, sym in enumerate(unique.tolist()):
        z = _element(sym, options.isotopes_as_hydrogen)
        if isinstance(z, str):
            site = labels[int(np.flatnonzero(inverse.reshape(-1) == k)[0])]
            raise _BlockSkip(f"{z} at site {site!r}")
        z_unique[k] = z
    return z_unique[inverse.reshape(-1)]


def _occupancies(table, labels: list[str]) -> np.ndarray:
    """(S,) float64 occupancy of each site row (missing or null: 1)."""
    if not table.has_column(_OCC):
        return np.ones(len(labels), dtype=np.float64)
    occ = _floats(list(table.column(_OCC)))
    occ[~np.isfinite(occ)] = 1.0
    if (occ < 0).any():
        k = int(np.flatnonzero(occ < 0)[0])
        raise _BlockSkip(f"negative occupancy {occ[k]:g} at site {labels[k]!r}")
    return occ


def _disorder_rows(table, occ: np.ndarray, options: ReadOptions
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept site rows, rows whose disorder groups decided them, partially occupied rows)
    under the disorder policy's first rule (disorder groups); see ReadOptions."""
    rows = len(occ)
    partial = occ < 1.0 - options.occupancy_tolerance
    groups = _unquote(table.column(_GROUP)) if table.has_column(_GROUP) else None
    grouped = (np.array([g not in _NULLS and g != "0" for g in groups], dtype=bool)
               if groups is not None else np.zeros(rows, dtype=bool))
    if options.disorder == "drop" and (partial.any() or grouped.any()):
        parts = []
        if partial.any():
            parts.append(f"{int(partial.sum())} partially occupied site(s)")
        if grouped.any():
            parts.append(f"{int(grouped.sum())} site(s) in disorder groups")
        raise _BlockSkip(f"disorder: {' and '.join(parts)} (disorder='drop')")
    if options.disorder == "majority" and grouped.any():
        assemblies = _unquote(table.column(_ASSEMBLY)) if table.has_column(_ASSEMBLY) else None
        site_keep, decided = _majority_groups(groups, assemblies, occ)
        return np.flatnonzero(site_keep), decided, partial
    return np.arange(rows), np.zeros(rows, dtype=bool), partial


@dataclasses.dataclass
class _Atoms:
    """Atoms of a unit cell during expansion: positions, source row, occupancy."""

    frac: np.ndarray  # (N, 3)
    parent: np.ndarray  # (N,) site row of each atom
    occ: np.ndarray  # (N,)

    def keep(self, mask: np.ndarray) -> None:
        self.frac, self.parent, self.occ = self.frac[mask], self.parent[mask], self.occ[mask]


def _expand(frac: np.ndarray, rows: np.ndarray, rot: np.ndarray, tran: np.ndarray,
            lattice: np.ndarray, numbers: np.ndarray, occ: np.ndarray,
            candidates_by_row: np.ndarray | None, options: ReadOptions) -> tuple[_Atoms, dict]:
    """The unit cell: symmetry images of the kept rows with copies of one site merged, then
    (majority) partial alternatives resolved and (merge_duplicates) duplicates merged.

    Returns the atoms and the atoms each policy removed:
    {'disorder_dropped': n, 'duplicates_merged': n}.
    """
    all_frac, parent = _symmetry_images(frac[rows], rot, tran)
    atoms = _Atoms(all_frac, rows[parent], np.zeros(0))
    candidates = candidates_by_row[atoms.parent] if candidates_by_row is not None else None
    resolve = candidates is not None and bool(candidates.any())
    merge_sq, overlap_sq = options.merge_tolerance ** 2, options.overlap_tolerance ** 2
    # One neighbour search serves the symmetry merge, disorder and duplicates.
    if rot.shape[0] > 1 or resolve or options.merge_duplicates:
        cutoff = max(options.merge_tolerance, options.overlap_tolerance if resolve else 0.0)
        i, j, d2 = _close_pairs(atoms.frac, lattice, cutoff, geometry.interplanar_spacings(lattice))
    else:
        i = j = np.zeros(0, dtype=np.int64)
        d2 = np.zeros(0)
    if rot.shape[0] > 1:  # copies of one site closer than merge_tolerance: one atom
        pick = (atoms.parent[i] == atoms.parent[j]) & (d2 < merge_sq)
        keep = _greedy_keep(atoms.parent.size, i[pick], j[pick])
        if not keep.all():
            atoms.frac, atoms.parent = atoms.frac[keep], atoms.parent[keep]
            i, j, d2 = _subset(keep, i, j, d2)
            candidates = candidates[keep] if candidates is not None else None
    atoms.occ = occ[atoms.parent]
    removed = {"disorder_dropped": 0, "duplicates_merged": 0}
    if resolve:
        pick = (d2 < overlap_sq) & (candidates[i] | candidates[j])
        keep = _majority_overlaps(atoms.occ, candidates, i[pick], j[pick])
        if not keep.all():
            removed["disorder_dropped"] = int((~keep).sum())
            atoms.keep(keep)
            i, j, d2 = _subset(keep, i, j, d2)
    if options.merge_duplicates:
        pick = ((d2 < merge_sq) & (numbers[atoms.parent[i]] == numbers[atoms.parent[j]])
                & (atoms.occ[i] + atoms.occ[j] > 1.0 + options.occupancy_tolerance))
        if pick.any():
            keep = _greedy_keep(atoms.parent.size, i[pick], j[pick])
            removed["duplicates_merged"] = int((~keep).sum())
            atoms.keep(keep)
    return atoms, removed


def _label_guesses(labels: list[str]) -> tuple[str, ...]:
    """Without _atom_site_type_symbol every element is guessed from its site label
    (`elements.element_from_type_symbol`): the note saying so, or a skip for a label whose
    one-letter element is followed by a lowercase letter. A two-letter symbol has its
    second letter in lowercase, so 'WatII' or 'Ow1' name something else (water) and would
    otherwise read as W or O; 'NaI', 'MgT', 'OW1' and 'HN1' read as Na, Mg, O and H."""
    guesses = {}
    for label in dict.fromkeys(labels):
        text = label.strip()
        try:
            symbol = elements.symbol(elements.element_from_type_symbol(text))
        except errors.UnknownElementError:
            continue  # dummy atoms and unknown types: the element check skips with a reason
        if len(symbol) == 1 and text[1:2].islower():
            raise _BlockSkip(f"no _atom_site_type_symbol, and site label {label!r} does not "
                             f"name its element ({text[:2]!r} is no element symbol; read as "
                             f"{symbol} it could be wrong)")
        guesses[label] = symbol
    shown = ", ".join(f"{label}->{e}" for label, e in list(guesses.items())[:6])
    more = f", ... ({len(guesses)} labels)" if len(guesses) > 6 else ""
    return (f"elements guessed from site labels (no _atom_site_type_symbol): {shown}{more}",)


def _read_block(block, name: str, source: str, options: ReadOptions) -> Structure:
    table = _site_table(block)
    lattice, cell = _cell(block)
    rot, tran = _symmetry(block, cell)
    labels, symbols = _site_names(table)
    frac = np.stack([_floats(list(table.column(c))) for c in (_X, _Y, _Z)], axis=1)
    bad = ~np.isfinite(frac).all(axis=1)
    if bad.all() and all(v in _NULLS for c in (_X, _Y, _Z) for v in table.column(c)):
        raise _BlockSkip("no atom sites (the atom site loop holds only '?' / '.')")
    notes = _label_guesses(labels) if not table.has_column(_TYPE) else ()
    numbers = _atomic_numbers(table, labels, symbols, options)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raw = [table.column(c)[k] for c in (_X, _Y, _Z)]
        raise _BlockSkip(f"missing or non-numeric coordinates at site {labels[k]!r} "
                         f"({' '.join(raw)}); {int(bad.sum())} such site(s)")
    _check_fractional(frac, labels)
    occ = _occupancies(table, labels)
    rows, decided, partial = _disorder_rows(table, occ, options)
    candidates = (partial & ~decided) if options.disorder == "majority" else None
    atoms, removed = _expand(frac, rows, rot, tran, lattice, numbers, occ, candidates, options)
    if atoms.parent.size == 0:
        raise _BlockSkip("no atoms left after resolving disorder (disorder='majority')")
    removed["disorder_dropped"] += _atoms_of_rows(np.setdiff1d(np.arange(len(occ)), rows),
                                                  frac, rot, tran, lattice, options)
    return Structure(
        id=f"{name}:{block.name}",
        source=source,
        lattice=lattice,
        frac=atoms.frac,
        numbers=numbers[atoms.parent],
        labels=np.asarray(labels, dtype=str)[atoms.parent],
        occupancies=atoms.occ.astype(np.float32),
        site_index=atoms.parent.astype(np.int32),
        removed={key: n for key, n in removed.items() if n},
        notes=notes,
    )


def _check_fractional(frac: np.ndarray, labels: list[str]) -> None:
    far = np.abs(frac).max(axis=1) > MAX_FRACTIONAL
    if far.any():
        k = int(np.flatnonzero(far)[0])
        raise _BlockSkip(f"fractional coordinate {np.abs(frac[k]).max():g} at site "
                         f"{labels[k]!r} beyond +-{MAX_FRACTIONAL:g} (no position in the cell "
                         f"survives); {int(far.sum())} such site(s)")


def _atoms_of_rows(rows: np.ndarray, frac: np.ndarray, rot: np.ndarray, tran: np.ndarray,
                   lattice: np.ndarray, options: ReadOptions) -> int:
    """How many unit-cell atoms the site rows `rows` stand for (their merged symmetry images)."""
    if rows.size == 0:
        return 0
    images, parent = _symmetry_images(frac[rows], rot, tran)
    if rot.shape[0] == 1:
        return int(images.shape[0])
    i, j, d2 = _close_pairs(images, lattice, options.merge_tolerance,
                            geometry.interplanar_spacings(lattice))
    pick = (parent[i] == parent[j]) & (d2 < options.merge_tolerance ** 2)
    return int(_greedy_keep(parent.size, i[pick], j[pick]).sum())


# --------------------------------------------------------------------------------------
# Documents, files, folders
# --------------------------------------------------------------------------------------

_READ_TAGS_PREFIXES = ("_cell_", "_atom_site_", "_space_group", "_symmetry_")


def _duplicate_read_tag(block) -> str | None:
    """A tag this reader uses that occurs twice in the block (only called on a file
    gemmi's strict check rejected)."""
    seen = set()
    for item in block:
        tags = item.loop.tags if item.loop is not None else (
            [item.pair[0]] if item.pair is not None else [])
        for tag in tags:
            low = tag.lower()
            if low in seen and low.startswith(_READ_TAGS_PREFIXES):
                return tag
            seen.add(low)
    return None


def _decode(data: str | bytes) -> str:
    """CIF bytes -> str: UTF-8 (CIF 2.0, ASCII CIF 1.1), else Latin-1 (never fails)."""
    if isinstance(data, str):
        return data[1:] if data.startswith("\ufeff") else data
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte order mark is dropped
    except UnicodeDecodeError:
        return data.decode("latin-1")


# Space-group names written without quotes although they contain spaces
# (`_symmetry_space_group_name_H-M    P 1`), a syntax error that some writers make.
_UNQUOTED_SPACE_GROUP = re.compile(
    r"^([ \t]*_(?:symmetry_space_group_name_H-M|space_group_name_H-M_alt|"
    r"space_group_name_Hall|symmetry_space_group_name_Hall))[ \t]+"
    r"([^'\"\s#;_][^'\"\n#]*?[ \t][^'\"\n#]*?)[ \t]*$", re.MULTILINE | re.IGNORECASE)


def _repair(text: str) -> str:
    """Quotes unquoted space-group names that contain spaces and unquoted values with
    characters beyond ASCII (tried after a parse error)."""
    text = _UNQUOTED_SPACE_GROUP.sub(lambda m: f"{m.group(1)} '{m.group(2)}'", text)
    return _UNQUOTED_NON_ASCII.sub(lambda m: f"'{m.group(1)}'", text)


# A value with characters beyond ASCII written without quotes (gemmi takes them only
# quoted): one token between white space, no quote or CIF syntax character in it.
_UNQUOTED_NON_ASCII = re.compile(r"(?<![^\s])((?![#;_$\[\]])[^\s'\"]*[^\x00-\x7f][^\s'\"]*)"
                                 r"(?![^\s])")


def _parse(text: str):
    """gemmi document and whether it needed the lenient check level.

    Strict first; on failure the lenient level 0 (duplicate tags / block names, checked
    per block later) and then the space-group quoting repair are tried; the first error
    is raised if nothing works."""
    try:
        return cif.read_string(text), False
    except Exception as strict_error:  # noqa: BLE001
        try:
            return cif.read_string(text, 0), True
        except Exception:  # noqa: BLE001
            repaired = _repair(text)
            if repaired == text:
                raise strict_error from None
            try:
                return _parse(repaired)
            except Exception:  # noqa: BLE001 - report the original file's error
                raise strict_error from None


def _non_ascii_hint(data: str | bytes) -> str:
    """'; line N holds U+XXXX ...' for the first character beyond ASCII (CIF 1.1 allows
    ASCII only, gemmi reports such a character as a bare 'parse error'), else ''."""
    text = _decode(data)
    match = re.search(r"[^\x00-\x7f]", text)
    if match is None:
        return ""
    line = text.count("\n", 0, match.start()) + 1
    return (f"; line {line} holds U+{ord(match.group()):04X} {match.group()!r}, not ASCII "
            f"(the reader takes it only inside quotes)")


def _iter_text(data: str | bytes, name: str, source: str,
               options: ReadOptions) -> Iterator[Structure | Skip]:
    """Structures and skips of one CIF document, in data block order."""
    try:
        doc, relaxed = _parse(_decode(data))
    except Exception as err:  # noqa: BLE001 - any parser failure becomes a Skip
        yield Skip(source, "", f"CIF parse error: {util.one_line(err, 200)}"
                               f"{_non_ascii_hint(data)}")
        return
    if len(doc) == 0:
        yield Skip(source, "", "no data blocks")
        return
    seen_blocks = set()
    for index, block in enumerate(doc):
        block_name = f"#{index}"
        try:
            block_name = block.name
            if relaxed:
                if block_name in seen_blocks:
                    raise _BlockSkip(f"duplicate data block name {block_name!r} in the file")
                duplicate = _duplicate_read_tag(block)
                if duplicate:
                    raise _BlockSkip(f"duplicate tag {duplicate} in the block")
            seen_blocks.add(block_name)
            yield _read_block(block, name, source, options)
        except _BlockSkip as why:
            yield Skip(source, block_name, str(why))
        except Exception as err:  # noqa: BLE001 - never crash on content
            yield Skip(source, block_name, f"unexpected error: {type(err).__name__}: "
                                           f"{util.one_line(err, 200)}")


def read_cif_text(text: str | bytes, name: str, options: ReadOptions = ReadOptions(), *,
                  source: str | None = None) -> tuple[list[Structure], list[Skip]]:
    """Reads every data block of CIF content.

    Args:
      text: the CIF file's content (bytes are decoded as UTF-8, else Latin-1).
      name: file name without extension; structure ids are f"{name}:{block name}".
      options: reading policies.
      source: recorded in `Structure.source` and `Skip.file` (default: name).
    Returns:
      (structures, skips), each in data block order. Never raises on bad content.
    """
    structures, skips = [], []
    for item in _iter_text(text, name, name if source is None else source, options):
        (structures if isinstance(item, Structure) else skips).append(item)
    return structures, skips


def read_cif(path: str | os.PathLike, options: ReadOptions = ReadOptions(), *,
             max_bytes: int | None = None) -> tuple[list[Structure], list[Skip]]:
    """Reads a CIF file; unreadable files and bad content become `Skip`s, never raise."""
    path = Path(path)
    data = read_file_bytes(path, max_bytes)
    if isinstance(data, Skip):
        return [], [data]
    return read_cif_text(data, path.stem, options, source=str(path))


# Largest file read (bytes); the tools' --max_file_mb sets it. The largest CIF of CoRE
# MOF 2019 is ~3 MB, of the COD ~60 MB.
MAX_FILE_BYTES = 256 << 20


def read_file_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes | Skip:
    """The bytes of a regular file, or a Skip saying why not: it is not a regular file
    (a FIFO, device, socket: never opened for reading, so never waited on), is larger
    than `max_bytes` (default MAX_FILE_BYTES), or cannot be read."""
    import stat

    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        return Skip(str(path), "", f"cannot read file: {err.strerror or err}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Skip(str(path), "", "cannot read file: not a regular file (a folder, FIFO, "
                                       "device or socket; never read)")
        if info.st_size > limit:
            return Skip(str(path), "", f"file larger than {limit / 2**20:g} MB "
                                       f"({info.st_size / 2**20:.1f} MB; --max_file_mb)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # grew while being read
            return Skip(str(path), "", f"file larger than {limit / 2**20:g} MB (--max_file_mb)")
        return data
    except OSError as err:
        return Skip(str(path), "", f"cannot read file: {err.strerror or err}")
    finally:
        os.close(fd)


def _walk_cifs(folder: Path) -> Iterator[Path]:
    """CIF files under folder in path order (entries sorted by name, folders entered
    where they sort); symbolic links to folders are not followed (no cycles). Every
    `*.cif` entry that is not a folder is yielded, links included, so that one that cannot
    be read (a dangling or looping link) is reported by `read_cif`, not lost."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_folder = False
        if is_folder:
            yield from _walk_cifs(Path(entry.path))
        elif entry.name.lower().endswith(".cif"):
            yield Path(entry.path)


def iter_cif_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """CIF files named by paths, deterministic: files as given, folders searched
    recursively for `*.cif` (any case) in sorted path order, one folder listing at a
    time (the tree is never listed whole). A path that does not exist is passed
    through so that `read_cif` reports it; repeated files are yielded once."""
    seen = set()
    for path in paths:
        path = Path(path)
        for candidate in _walk_cifs(path) if path.is_dir() else (path,):
            if candidate not in seen:
                seen.add(candidate)
                yield candidate


def iter_structures(paths: Iterable[str | os.PathLike], options: ReadOptions = ReadOptions()
                    ) -> Iterator[Structure | Skip]:
    """Streams the structures and skips of all CIFs under paths, file by file, in
    data block order (memory does not grow with the number of files)."""
    for path in iter_cif_paths(paths):
        data = read_file_bytes(path)
        if isinstance(data, Skip):
            yield data
            continue
        yield from _iter_text(data, path.stem, str(path), options)


# --------------------------------------------------------------------------------------
# Embedded data sets
# --------------------------------------------------------------------------------------

CORE_MOF_VERSIONS = ("2019-ASR", "2019-FSR", "2014")


def _package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of a package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise errors.DataNotFoundError(
            f"the {pip_name} package is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def core_mof_archive(version: str = "2019-ASR") -> Path:
    """Path of the core-mof package's `CoRE_MOF/data/<version>.tar.xz`."""
    if version not in CORE_MOF_VERSIONS:
        raise errors.DataNotFoundError(
            f"unknown CoRE MOF version {version!r}; choose one of {', '.join(CORE_MOF_VERSIONS)}")
    archive = _package_dir("CoRE_MOF", "core-mof") / "data" / f"{version}.tar.xz"
    if not archive.is_file():
        raise errors.DataNotFoundError(f"CoRE MOF archive {archive} is missing from the core-mof package")
    return archive


def iter_core_mof(version: str = "2019-ASR", options: ReadOptions = ReadOptions(),
                  limit: int | None = None) -> Iterator[Structure | Skip]:
    """Streams the CIFs of a CoRE MOF archive straight out of the core-mof package.

    The tar.xz is read member by member (tarfile stream mode), so memory stays flat.
    Structure ids are "<member stem>:<block name>", sources "<archive>!<member>".

    Args:
      version: "2019-ASR" (default), "2019-FSR" or "2014".
      options: reading policies.
      limit: read at most this many CIF members (None: all).
    Raises:
      DataNotFoundError: core-mof is not installed or has no such archive.
    """
    archive = core_mof_archive(version)
    for member, data in iter_tar_cifs(archive, limit):
        yield from _iter_text(data, PurePosixPath(member).stem, f"{archive.name}!{member}",
                              options)


def iter_tar_cifs(archive: str | os.PathLike, limit: int | None = None
                  ) -> Iterator[tuple[str, bytes]]:
    """Streams (member name, bytes) of the regular `*.cif` members of a tar archive.

    Any compression tarfile detects; archive order; at most `limit` members. Stream
    mode with headers dropped as it goes, so memory stays flat on large archives.
    """
    count = 0
    with tarfile.open(archive, mode="r|*") as tar:
        while limit is None or count < limit:
            member = tar.next()
            if member is None:
                break
            if member.isfile() and member.name.lower().endswith(".cif"):
                handle = tar.extractfile(member)
                count += 1
                yield member.name, handle.read() if handle is not None else b""
            tar.members.clear()  # stream mode keeps every header otherwise


def pyxtal_db_path() -> Path:
    """Path of pyxtal's `database/test.db` (100 CSD molecular crystals, ASE sqlite)."""
    path = _package_dir("pyxtal", "pyxtal") / "database" / "test.db"
    if not path.is_file():
        raise errors.DataNotFoundError(f"{path} is missing from the pyxtal package")
    return path


def _site_labels(numbers: np.ndarray) -> np.ndarray:
    """'C1', 'C2', 'H1', ... numbered per element in order of appearance."""
    counts: dict[int, int] = {}
    out = []
    for z in numbers.tolist():
        counts[z] = counts.get(z, 0) + 1
        out.append(f"{elements.symbol(z)}{counts[z]}")
    return np.asarray(out, dtype=str)


def read_pyxtal_db(path: str | os.PathLike | None = None) -> list[Structure]:
    """The 100 CSD molecular crystals of pyxtal's `database/test.db`, ids "test:<refcode>".

    Reads the ASE sqlite database directly with sqlite3 + numpy (no ASE needed):
    `numbers` int32, `positions` (N, 3) float64 Cartesian angstrom and `cell` (3, 3)
    float64 rows blobs, little-endian; refcode from the `csd_code` key.
    Raises:
      DataNotFoundError: pyxtal is not installed.
      DataFormatError: the database does not have that layout.
    """
    path = Path(path) if path is not None else pyxtal_db_path()
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT id, numbers, positions, cell, pbc, key_value_pairs "
                               "FROM systems ORDER BY id").fetchall()
        finally:
            con.close()
    except sqlite3.Error as err:
        raise errors.DataFormatError(f"{path}: not an ASE database ({err})") from None
    structures = []
    for row_id, numbers_blob, positions_blob, cell_blob, pbc, kvp in rows:
        try:
            numbers = np.frombuffer(numbers_blob, dtype="<i4").astype(np.int32)
            positions = np.frombuffer(positions_blob, dtype="<f8").reshape(-1, 3)
            lattice = np.frombuffer(cell_blob, dtype="<f8").reshape(3, 3).astype(np.float64)
            if positions.shape[0] != numbers.shape[0]:
                raise ValueError("numbers and positions differ in length")
            if pbc != 7 or not abs(np.linalg.det(lattice)) > 1e-6:
                raise ValueError("not a periodic 3D cell")
            if numbers.size == 0 or numbers.min() < 1 or numbers.max() > elements.NUM_ELEMENTS:
                raise ValueError("atomic numbers outside 1..118")
            key_values = json.loads(kvp) if kvp else {}
        except (TypeError, ValueError) as err:
            raise errors.DataFormatError(f"{path} row {row_id}: {err}") from None
        code = key_values.get("csd_code") or key_values.get("name") or f"row{row_id}"
        frac = np.linalg.solve(lattice.T, positions.T).T
        structures.append(Structure.from_arrays(lattice, frac, numbers, id=f"test:{code}",
                                                source=f"{path}#{row_id}"))
    return structures
