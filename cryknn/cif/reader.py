"""CIF reading: one data block -> `Structure` (symmetry expansion, merges, disorder), CIF
documents (parse, repair, per-block skips), files and folders.

Readers return structures together with `Skip` records (file, block, reason) for
everything they could not read, so nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from gemmi import cif

from cryknn import geometry
from cryknn import util
from cryknn.cif import cell
from cryknn.cif import disorder
from cryknn.cif import sites
from cryknn.cif import symmetry
from cryknn.cif import values
from cryknn.cif.options import ReadOptions
from cryknn.cif.structure import Skip, Structure
from cryknn.cif.values import BlockSkip


# --------------------------------------------------------------------------------------
# One data block
# --------------------------------------------------------------------------------------

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
    all_frac, parent = symmetry.site_images(frac[rows], rot, tran)
    atoms = _Atoms(all_frac, rows[parent], np.zeros(0))
    candidates = candidates_by_row[atoms.parent] if candidates_by_row is not None else None
    resolve = candidates is not None and bool(candidates.any())
    merge_sq, overlap_sq = options.merge_tolerance ** 2, options.overlap_tolerance ** 2
    # One neighbour search serves the symmetry merge, disorder and duplicates.
    if rot.shape[0] > 1 or resolve or options.merge_duplicates:
        cutoff = max(options.merge_tolerance, options.overlap_tolerance if resolve else 0.0)
        i, j, d2 = cell.close_pairs(atoms.frac, lattice, cutoff,
                                    geometry.interplanar_spacings(lattice))
    else:
        i = j = np.zeros(0, dtype=np.int64)
        d2 = np.zeros(0)
    if rot.shape[0] > 1:  # copies of one site closer than merge_tolerance: one atom
        pick = (atoms.parent[i] == atoms.parent[j]) & (d2 < merge_sq)
        keep = symmetry.greedy_keep(atoms.parent.size, i[pick], j[pick])
        if not keep.all():
            atoms.frac, atoms.parent = atoms.frac[keep], atoms.parent[keep]
            i, j, d2 = cell.subset(keep, i, j, d2)
            candidates = candidates[keep] if candidates is not None else None
    atoms.occ = occ[atoms.parent]
    removed = {"disorder_dropped": 0, "duplicates_merged": 0}
    if resolve:
        pick = (d2 < overlap_sq) & (candidates[i] | candidates[j])
        keep = disorder.majority_overlaps(atoms.occ, candidates, i[pick], j[pick])
        if not keep.all():
            removed["disorder_dropped"] = int((~keep).sum())
            atoms.keep(keep)
            i, j, d2 = cell.subset(keep, i, j, d2)
    if options.merge_duplicates:
        pick = ((d2 < merge_sq) & (numbers[atoms.parent[i]] == numbers[atoms.parent[j]])
                & (atoms.occ[i] + atoms.occ[j] > 1.0 + options.occupancy_tolerance))
        if pick.any():
            keep = symmetry.greedy_keep(atoms.parent.size, i[pick], j[pick])
            removed["duplicates_merged"] = int((~keep).sum())
            atoms.keep(keep)
    return atoms, removed


def _atoms_of_rows(rows: np.ndarray, frac: np.ndarray, rot: np.ndarray, tran: np.ndarray,
                   lattice: np.ndarray, options: ReadOptions) -> int:
    """How many unit-cell atoms the site rows `rows` stand for (their merged symmetry images)."""
    if rows.size == 0:
        return 0
    images, parent = symmetry.site_images(frac[rows], rot, tran)
    if rot.shape[0] == 1:
        return int(images.shape[0])
    i, j, d2 = cell.close_pairs(images, lattice, options.merge_tolerance,
                                geometry.interplanar_spacings(lattice))
    pick = (parent[i] == parent[j]) & (d2 < options.merge_tolerance ** 2)
    return int(symmetry.greedy_keep(parent.size, i[pick], j[pick]).sum())


def _read_block(block, name: str, source: str, options: ReadOptions) -> Structure:
    table = sites.site_table(block)
    lattice, unit = cell.unit_cell(block)
    rot, tran = symmetry.operations(block, unit)
    labels, symbols = sites.site_names(table)
    xyz = (sites.X, sites.Y, sites.Z)
    frac = np.stack([values.floats(list(table.column(c))) for c in xyz], axis=1)
    bad = ~np.isfinite(frac).all(axis=1)
    if bad.all() and all(v in values.NULLS for c in xyz for v in table.column(c)):
        raise BlockSkip("no atom sites (the atom site loop holds only '?' / '.')")
    notes = sites.label_guesses(labels) if not table.has_column(sites.TYPE) else ()
    numbers = sites.atomic_numbers(table, labels, symbols, options)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raw = [table.column(c)[k] for c in xyz]
        raise BlockSkip(f"missing or non-numeric coordinates at site {labels[k]!r} "
                        f"({' '.join(raw)}); {int(bad.sum())} such site(s)")
    sites.check_fractional(frac, labels)
    occ = sites.occupancies(table, labels)
    rows, decided, partial = disorder.resolve_groups(table, occ, options)
    candidates = (partial & ~decided) if options.disorder == "majority" else None
    atoms, removed = _expand(frac, rows, rot, tran, lattice, numbers, occ, candidates, options)
    if atoms.parent.size == 0:
        raise BlockSkip("no atoms left after resolving disorder (disorder='majority')")
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


# A value with characters beyond ASCII written without quotes (gemmi takes them only
# quoted): one token between white space, no quote or CIF syntax character in it.
_UNQUOTED_NON_ASCII = re.compile(r"(?<![^\s])((?![#;_$\[\]])[^\s'\"]*[^\x00-\x7f][^\s'\"]*)"
                                 r"(?![^\s])")


def _repair(text: str) -> str:
    """Quotes unquoted space-group names that contain spaces and unquoted values with
    characters beyond ASCII (tried after a parse error)."""
    text = _UNQUOTED_SPACE_GROUP.sub(lambda m: f"{m.group(1)} '{m.group(2)}'", text)
    return _UNQUOTED_NON_ASCII.sub(lambda m: f"'{m.group(1)}'", text)


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


def iter_text(data: str | bytes, name: str, source: str,
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
                    raise BlockSkip(f"duplicate data block name {block_name!r} in the file")
                duplicate = _duplicate_read_tag(block)
                if duplicate:
                    raise BlockSkip(f"duplicate tag {duplicate} in the block")
            seen_blocks.add(block_name)
            yield _read_block(block, name, source, options)
        except BlockSkip as why:
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
    for item in iter_text(text, name, name if source is None else source, options):
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
        yield from iter_text(data, path.stem, str(path), options)

