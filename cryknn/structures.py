"""Crystal structure records and CIF reading.

A `Structure` is a periodic point set: a lattice plus a motif of typed atoms in
fractional coordinates. Readers return structures together with `Skip` records
(file, block, reason) for everything they could not read, so nothing is lost silently.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
    """

    id: str
    source: str
    lattice: np.ndarray
    frac: np.ndarray
    numbers: np.ndarray
    labels: np.ndarray
    occupancies: np.ndarray

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def cart(self) -> np.ndarray:
        """(N, 3) float64 Cartesian coordinates in angstrom."""
        return self.frac @ self.lattice


@dataclasses.dataclass(frozen=True)
class Skip:
    """A file or data block that was not read, and why (one line, human readable)."""

    file: str
    block: str
    reason: str
