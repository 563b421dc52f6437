"""Structures from any file, and their k-NN: the `cryknn.read` and `cryknn.knn` API.

CIF files (and folders of them, recursively) are read natively (`cryknn.cif`);
other formats (POSCAR, extxyz, ...) through ase when it is installed
(`pip install 'cryknn[ase]'`). What could not be read is kept with its reason in
`Structures.skips`, as the command-line tools report it. A path that does not exist raises
FileNotFoundError. `iter_read` is the reading loop of `cryknn predict` and `cryknn featurize`
(`read_files` collects it): folders are searched for CIFs, named files are read in any
format `read` takes.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

from cryknn import cif
from cryknn import errors
from cryknn import util


class Structures(list):
    """A list of Structure; `skips` holds a Skip (file, block, reason) per part not read."""

    def __init__(self, items=(), skips: Sequence[cif.Skip] = ()):
        super().__init__(items)
        self.skips = list(skips)


def _is_cif(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(".cif")


def read(path: str | os.PathLike, options: cif.ReadOptions | None = None, *,
         format: str | None = None) -> Structures:
    """Every structure in a file or folder (CIFs found recursively).

    options: the CIF reader's policies (ReadOptions). format: ase's format name for a
    non-CIF file (default: ase guesses from the name). Raises FileNotFoundError (an
    `InputNotFoundError`) for a path that does not exist, DataError when a non-CIF file
    needs ase and ase is not installed; unreadable content is a Skip, never an exception.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise errors.InputNotFoundError(f"no such file or folder: {path}")
    if format is None and _is_cif(path):
        found, skips = [], []
        for file in cif.iter_cif_paths([path]):
            good, bad = cif.read_cif(file, options or cif.ReadOptions())
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
        return Structures([], [cif.Skip(path, "", f"ase could not read it: {e}")])
    found, skips = [], []
    for i, atoms in enumerate(images):
        block = str(i) if len(images) > 1 else stem
        try:
            found.append(cif.Structure.from_ase(atoms, id=f"{stem}:{block}"))
        except errors.DataFormatError as e:
            skips.append(cif.Skip(path, block, str(e)))
    return Structures(found, skips)


def read_file(path: str | os.PathLike, options: cif.ReadOptions | None = None
              ) -> tuple[list[cif.Structure], list[cif.Skip]]:
    """(structures, skips) of one file of any format `read` takes; never raises: a missing
    file, or a non-CIF file without ase, is a Skip whose reason says so."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return [], [cif.Skip(path, "", "no such file or folder")]
    if _is_cif(path):
        return cif.read_cif(path, options or cif.ReadOptions())
    try:
        found = _read_with_ase(path, None)
    except errors.DataError as e:
        return [], [cif.Skip(path, "", str(e))]
    return list(found), found.skips


def require_readers(paths: Sequence[str | os.PathLike]) -> None:
    """Raises MissingExtraError, before anything is read, when a file named in `paths` is
    not a CIF and ase (the `ase` extra) is not installed."""
    from cryknn import extras

    others = [os.fspath(p) for p in paths if os.path.lexists(p) and not _is_cif(os.fspath(p))]
    if others and not extras.installed("ase"):
        extras.require("ase", f"reading {os.path.basename(others[0])} (only CIF is read "
                       f"natively)")


class ReadReport:
    """What `read_files` read: unpacks as (structures, messages, all_read)."""

    def __init__(self):
        self.structures: list[cif.Structure] = []
        self.messages: list[str] = []
        self.files = 0  # files looked at
        self.not_read = 0  # files that gave no structure

    @property
    def all_read(self) -> bool:
        return self.not_read == 0

    def __iter__(self):
        return iter((self.structures, self.messages, self.all_read))


def iter_read(paths: Sequence[str], options: cif.ReadOptions | None = None,
              progress=None) -> Iterator[tuple[str, list[cif.Structure], list[cif.Skip]]]:
    """The one reading loop of the tools: per file of `paths` (folders: CIFs, recursively;
    files: any format `read` takes), (path, the structures that can be featurised, a Skip
    per block not read). progress(done, total) is called as each file is read."""
    from cryknn import neighbours

    files = list(cif.iter_cif_paths(paths))
    for path in files:
        found, skips = read_file(path, options)
        good, unusable = neighbours.split_featurizable(found)
        if progress is not None:
            progress(1, len(files))
        yield path, good, skips + unusable


def read_files(paths: Sequence[str], options: cif.ReadOptions | None = None,
               progress=None) -> ReadReport:
    """Every structure in the files and folders of `paths` that can be featurised
    (`iter_read`), one message line per file not read or block skipped."""
    report = ReadReport()
    for path, good, skips in iter_read(paths, options, progress):
        report.files += 1
        if not good:
            report.not_read += 1
            reason = "; ".join(sk.reason for sk in skips[:3]) or "no structures in file"
            report.messages.append(f"{path}: not read: {util.one_line(reason)}")
        else:
            report.messages.extend(f"{path}: block {sk.block or '?'} skipped: "
                                   f"{util.one_line(sk.reason)}" for sk in skips)
        report.structures.extend(good)
    return report


def knn(structures, k: int):
    """Exact periodic k-NN of every atom: one `neighbours.Neighbours` (distances (N, k),
    indices (N, k) of each neighbour's atom, radius, vectors (N, k, 3) float32 displacement
    from the atom to that neighbour's image in angstrom, Cartesian in the structure's
    lattice frame) per structure. structures: one Structure, ase.Atoms or pymatgen
    Structure, or a list of them."""
    from cryknn import neighbours

    return neighbours.featurize(cif.as_structures(structures), k)
