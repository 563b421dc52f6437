"""Exact periodic k-NN distances of every atom of CIF files, as one .npz.

  python -m cryknn.featurize --k=K --out=FILE.npz PATH [PATH ...]
  cryknn featurize --k=K --out=FILE.npz PATH [PATH ...]

PATHs are structure files (CIF natively; POSCAR, extxyz, ... through the `ase` extra, as
`cryknn.read` reads them) or folders (searched recursively for *.cif). The .npz holds one row
per unit-cell atom: distances (A, k) float32, neighbour_index (A, k) int32 (the row of each
neighbour's motif atom in this file), neighbour_vector (A, k, 3) float32 (the displacement
from the atom to that neighbour's image, angstrom, Cartesian in its structure's lattice
frame; |neighbour_vector| == distances), structure_id, site_label and atomic_number; then
the tool prints what was skipped and why, file by file. The reader's policies are flags
(--disorder, --merge_duplicates, ...). The library behind it is `cryknn.neighbours`. When
no structure could be featurised, nothing is written and the exit status is 1.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import numpy as np

from cryknn import cif
from cryknn import command
from cryknn import errors
from cryknn import util

USAGE = """\
usage: {prog} --k=K --out=FILE.npz PATH [PATH ...]

Exact periodic k-nearest-neighbour distances of every atom in CIF files or folders
(searched recursively), written as one .npz row per unit-cell atom."""
MAX_LISTED_SKIPS = 20


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("k", 5, "Neighbours per atom (>= 1).")
    flags.DEFINE_string("out", None, "Output file; must end in .npz.")
    flags.DEFINE_integer("chunk_structures", 512,
                         "Structures read before each featurisation pass (bounds memory).")
    flags.DEFINE_integer("max_file_mb", 256, "Files larger than this (MB) are skipped "
                         "unread.", lower_bound=1)
    command.define_dataclass_flags(cif.ReadOptions)


def check_arguments(paths: Sequence[str], k: int, out: str | None, chunk: int) -> None:
    """Raise ConfigError (one line) for the first unusable argument."""
    if k < 1:
        raise errors.ConfigError(f"--k must be >= 1, got {k}")
    if k > 1024:  # neighbours.MAX_K (not imported here: JAX loads slowly)
        raise errors.ConfigError(f"--k must be at most 1024, got {k}")
    if chunk < 1:
        raise errors.ConfigError(f"--chunk_structures must be >= 1, got {chunk}")
    if not out:
        raise errors.ConfigError("--out=FILE.npz is required")
    if not out.endswith(".npz"):
        raise errors.ConfigError(f"--out must name a .npz file, got {out}")
    if os.path.isdir(out):
        raise errors.ConfigError(f"--out {out} is a directory")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise errors.ConfigError(f"cannot write --out into {out_dir}")
    if not paths:
        raise errors.ConfigError("give one or more CIF files or folders")
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise errors.ConfigError(f"no such file or folder: {missing[0]}")
    command.check_output(out, paths)


class Rows:
    """The output table, filled structure by structure."""

    def __init__(self, k: int):
        self.k = k
        self.parts: dict[str, list[np.ndarray]] = {
            "distances": [], "neighbour_index": [], "structure_id": [], "site_label": [],
            "atomic_number": [], "neighbour_vector": []}
        self.num_atoms = 0
        self.num_structures = 0
        self.removed = cif.RemovalCounter()  # atoms the reading policies removed
        self.guessed = 0  # structures whose elements were guessed from site labels

    def add(self, structure: cif.Structure, distances: np.ndarray,
            indices: np.ndarray, vectors: np.ndarray) -> None:
        """One structure's rows: distances, indices (N, k) and vectors (N, k, 3)."""
        n = structure.num_atoms
        self.parts["distances"].append(distances)
        self.parts["neighbour_index"].append(indices + self.num_atoms)
        self.parts["neighbour_vector"].append(vectors)
        self.parts["structure_id"].append(np.full(n, structure.id, dtype=object))
        self.parts["site_label"].append(np.asarray(structure.labels, dtype=object))
        self.parts["atomic_number"].append(np.asarray(structure.numbers, np.int32))
        self.num_atoms += n
        self.num_structures += 1
        self.removed.add(structure)
        self.guessed += bool(getattr(structure, "notes", ()))

    def arrays(self) -> dict[str, np.ndarray]:
        empty = {"distances": np.zeros((0, self.k), np.float32),
                 "neighbour_index": np.zeros((0, self.k), np.int32),
                 "structure_id": np.zeros(0, object), "site_label": np.zeros(0, object),
                 "atomic_number": np.zeros(0, np.int32),
                 "neighbour_vector": np.zeros((0, self.k, 3), np.float32)}
        out = {name: np.concatenate(parts) if parts else empty[name]
               for name, parts in self.parts.items()}
        for name in ("structure_id", "site_label"):
            out[name] = out[name].astype(str)  # fixed-width strings: no pickle needed to load
        return out


def featurize_files(paths: Sequence[str], k: int, options: cif.ReadOptions,
                    chunk: int, progress=None) -> tuple[Rows, list[cif.Skip]]:
    """Reads and featurises every CIF under paths, `chunk` structures at a time."""
    from cryknn import neighbours
    from cryknn import reading

    rows, skips = Rows(k), []
    files = list(cif.iter_cif_paths(paths))
    for batch in util.chunked(files, chunk):
        read = []
        for path in batch:
            found, skipped = reading.read_file(path, options)
            read.extend(found)
            skips.extend(skipped)
            if progress is not None:
                progress(1, len(files))
        good, found, unusable = neighbours.featurize_isolated(read, k)
        skips.extend(unusable)
        for s, nb in zip(good, found):
            rows.add(s, nb.distances, nb.indices, nb.vectors)
    return rows, skips


def skip_report(skips: Sequence[cif.Skip], limit: int = MAX_LISTED_SKIPS) -> str:
    """`N skipped`, then each skipped file (and block) with its reason, then counts per reason."""
    if not skips:
        return "0 skipped"
    lines = [f"{len(skips)} skipped:"]
    for skip in skips[:limit]:
        where = skip.file + (f" [{skip.block}]" if skip.block else "")
        lines.append(f"  {where}: {util.one_line(skip.reason, 160)}")
    if len(skips) > limit:
        lines.append(f"  ... and {len(skips) - limit} more; by reason:")
        lines.extend(cif.summarize_skips(skip.reason for skip in skips))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from absl import flags

    from cryknn import neighbours
    from cryknn import reading

    FLAGS = flags.FLAGS
    paths = argv[1:]
    check_arguments(paths, FLAGS.k, FLAGS.out, FLAGS.chunk_structures)
    reading.require_readers(paths)
    options = command.dataclass_from_flags(cif.ReadOptions)
    cif.reader.MAX_FILE_BYTES = FLAGS.max_file_mb << 20
    neighbours.enable_compilation_cache()
    start = time.perf_counter()
    bar = _ProgressBar()
    try:
        rows, skips = featurize_files(paths, FLAGS.k, options, FLAGS.chunk_structures,
                                      progress=bar.update)
    finally:
        bar.close()
    if rows.num_structures == 0:
        return _nothing_featurised(skips)
    with util.atomic_path(FLAGS.out, suffix=".npz") as tmp:
        np.savez(tmp, **rows.arrays())  # uncompressed: float32 distances barely compress
    print(f"wrote {FLAGS.out}: {rows.num_atoms} atoms from {rows.num_structures} structures, "
          f"k={FLAGS.k}, {time.perf_counter() - start:.1f} s")
    print(skip_report(skips))
    removed = rows.removed.lines()
    print("reading policies removed atoms:" if removed else
          "reading policies removed no atoms")
    if removed:
        print("\n".join(removed))
    if rows.guessed:
        print(f"elements guessed from site labels (no _atom_site_type_symbol) in "
              f"{rows.guessed} structure{'s' if rows.guessed > 1 else ''}")
    return 0


def _nothing_featurised(skips: Sequence[cif.Skip]) -> int:
    """Exit status 1, no file: the skips on stdout, one error line on stderr."""
    print(skip_report(skips))
    files = len({skip.file for skip in skips})
    print(f"error: nothing to write: no structure in the {files} input file(s) could be "
          f"featurised (reasons above); no file written", file=sys.stderr)
    return 1


class _ProgressBar:
    """A tqdm bar over files on stderr, created at the first update (total known then)."""

    def __init__(self):
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, module="cryknn.featurize", define_flags=define_flags,
                     argv=argv)


if __name__ == "__main__":
    run()
