"""Embedded data sets: CoRE MOF archives (core-mof package), tar archives of CIFs and
pyxtal's database of molecular crystals."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from cryknn import elements
from cryknn import errors
from cryknn.cif import reader
from cryknn.cif.options import ReadOptions
from cryknn.cif.structure import Skip, Structure

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
        yield from reader.iter_text(data, PurePosixPath(member).stem, f"{archive.name}!{member}",
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
