"""Crystal structure records: `Structure` (a lattice and a motif of typed atoms), `Skip`
(what a reader could not read, and why), and structures from and to ase and pymatgen."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np

from cryknn import elements
from cryknn import errors
from cryknn import geometry

# |fractional coordinate| read: beyond this, float64 keeps no digit of the position in
# the cell (1e300 - floor(1e300) is 0), and no writer means a position 10^6 cells away.
MAX_FRACTIONAL = 1e6


def _site_labels(numbers: np.ndarray) -> np.ndarray:
    """'C1', 'C2', 'H1', ... numbered per element in order of appearance."""
    counts: dict[int, int] = {}
    out = []
    for z in numbers.tolist():
        counts[z] = counts.get(z, 0) + 1
        out.append(f"{elements.symbol(z)}{counts[z]}")
    return np.asarray(out, dtype=str)


def _import_ase():
    try:
        import ase
    except ImportError:
        raise errors.UserError("this needs ase: pip install 'cryknn[ase]'") from None
    return ase


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
        return cls(id=id, source=source or id, lattice=lattice, frac=geometry.wrap(frac),
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


@dataclasses.dataclass(frozen=True)
class Skip:
    """A file or data block that was not read, and why (one line, human readable)."""

    file: str
    block: str
    reason: str

