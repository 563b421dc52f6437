"""Structures from any file, and their k-NN: the `cryknn.read` and `cryknn.knn` API.

CIF files (and folders of them, recursively) are read natively (`cryknn.structures`);
other formats (POSCAR, extxyz, ...) through ase when it is installed
(`pip install 'cryknn[ase]'`). What could not be read is kept with its reason in
`Structures.skips`, as the command-line tools report it.
"""

from __future__ import annotations

import os
from typing import Sequence

from cryknn import errors
from cryknn import structures as structures_lib


class Structures(list):
    """A list of Structure; `skips` holds a Skip (file, block, reason) per part not read."""

    def __init__(self, items=(), skips: Sequence[structures_lib.Skip] = ()):
        super().__init__(items)
        self.skips = list(skips)


def _is_cif(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(".cif")


def read(path: str | os.PathLike, options: structures_lib.ReadOptions | None = None, *,
         format: str | None = None) -> Structures:
    """Every structure in a file or folder (CIFs found recursively).

    options: the CIF reader's policies (ReadOptions). format: ase's format name for a
    non-CIF file (default: ase guesses from the name). Raises DataError when a non-CIF file
    needs ase and ase is not installed; anything unreadable is a Skip, never an exception.
    """
    path = os.fspath(path)
    if format is None and _is_cif(path):
        found, skips = [], []
        for file in structures_lib.iter_cif_paths([path]):
            good, bad = structures_lib.read_cif(file, options or structures_lib.ReadOptions())
            found += good
            skips += bad
        return Structures(found, skips)
    return _read_with_ase(path, format)


def _read_with_ase(path: str, format: str | None) -> Structures:
    try:
        import ase.io
    except ImportError:
        raise errors.DataError(f"reading {os.path.basename(path)} needs ase (only CIF is "
                               f"read natively): pip install 'cryknn[ase]'") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        images = ase.io.read(path, index=":", format=format)
    except Exception as e:  # noqa: BLE001 - any reader failure is a skip with its reason
        return Structures([], [structures_lib.Skip(path, "", f"ase could not read it: {e}")])
    found, skips = [], []
    for i, atoms in enumerate(images):
        block = str(i) if len(images) > 1 else stem
        try:
            found.append(structures_lib.Structure.from_ase(atoms, id=f"{stem}:{block}"))
        except errors.DataFormatError as e:
            skips.append(structures_lib.Skip(path, block, str(e)))
    return Structures(found, skips)


def knn(structures: Sequence[structures_lib.Structure], k: int):
    """Exact periodic k-NN of every atom: one `neighbours.Neighbours` (distances (N, k),
    indices (N, k) of each neighbour's atom, radius, vectors (N, k, 3) float32 displacement
    from the atom to that neighbour's image in angstrom, Cartesian in the structure's
    lattice frame) per structure."""
    from cryknn import neighbours

    if isinstance(structures, structures_lib.Structure):
        structures = [structures]
    return neighbours.featurize(list(structures), k)
