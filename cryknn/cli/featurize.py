"""Exact periodic k-NN distances of every atom of CIF files, as one .npz.

  python -m cryknn.featurize --k=K --out=FILE.npz PATH [PATH ...]
  cryknn featurize --k=K --out=FILE.npz PATH [PATH ...]

PATHs are structure files (CIF natively; POSCAR, extxyz, ... through the `ase` extra, as
`cryknn.read` reads them) or folders (searched recursively for *.cif). The .npz holds one row
per unit-cell atom: distances (A, k) float32, neighbour_index (A, k) int32 (the row of each
neighbour's motif atom in this file), neighbour_vector (A, k, 3) float32 (the displacement
from the atom to that neighbour's image, angstrom, Cartesian in its structure's lattice
frame; |neighbour_vector| == distances), structure_id, site_label, atomic_number and site
(A,) int64 (the CIF site each atom stands for, numbered across the file; what masked-atom
mode hides); then the tool prints what was skipped and why, file by file. The reader's
policies are flags (--disorder, --merge_duplicates, ...). The file is the atom table of
`cryknn.features` (the one training and scoring read) in per-atom form. When
no structure could be featurised, nothing is written and the exit status is 1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

import numpy as np

from cryknn import cif
from cryknn import errors
from cryknn import features
from cryknn import util
from cryknn.cli import command

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
                         "Files read before each featurisation pass (bounds memory).")
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


@dataclasses.dataclass
class Featurised:
    """What `featurize_files` made of its inputs."""

    table: features.AtomTable | None  # None: nothing could be featurised
    skips: list[cif.Skip]
    removed: cif.RemovalCounter  # atoms the reading policies removed
    guessed: int = 0  # structures whose elements were guessed from site labels


def featurize_files(paths: Sequence[str], k: int, options: cif.ReadOptions,
                    chunk: int, progress=None) -> Featurised:
    """Reads (`reading.iter_read`) and featurises every structure under paths, `chunk`
    files at a time (bounds memory: only the k-NN tables are kept)."""
    from cryknn import neighbours
    from cryknn import reading

    tables, done = [], Featurised(None, [], cif.RemovalCounter())
    for batch in util.chunked(reading.iter_read(paths, options, progress), chunk):
        read = [s for _, good, _ in batch for s in good]
        done.skips.extend(skip for _, _, skips in batch for skip in skips)
        good, found, unusable = neighbours.featurize_isolated(read, k)
        done.skips.extend(unusable)
        for s in good:
            done.removed.add(s)
            done.guessed += bool(getattr(s, "notes", ()))
        if good:
            tables.append(features.table_from(good, found, k))
    done.table = features.concatenate(tables) if tables else None
    return done


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
    bar = util.ProgressBar("file")
    try:
        done = featurize_files(paths, FLAGS.k, options, FLAGS.chunk_structures,
                               progress=bar.update)
    finally:
        bar.close()
    if done.table is None:
        return _nothing_featurised(done.skips)
    with util.atomic_path(FLAGS.out, suffix=".npz") as tmp:
        # uncompressed: float32 distances barely compress
        np.savez(tmp, **done.table.per_atom_arrays())
    print(f"wrote {FLAGS.out}: {len(done.table)} atoms from {len(done.table.structure_id)} "
          f"structures, k={FLAGS.k}, {time.perf_counter() - start:.1f} s")
    print(skip_report(done.skips))
    removed = done.removed.lines()
    print("reading policies removed atoms:" if removed else
          "reading policies removed no atoms")
    if removed:
        print("\n".join(removed))
    if done.guessed:
        print(f"elements guessed from site labels (no _atom_site_type_symbol) in "
              f"{done.guessed} structure{'s' if done.guessed > 1 else ''}")
    return 0


def _nothing_featurised(skips: Sequence[cif.Skip]) -> int:
    """Exit status 1, no file: the skips on stdout, one error line on stderr."""
    print(skip_report(skips))
    files = len({skip.file for skip in skips})
    print(f"error: nothing to write: no structure in the {files} input file(s) could be "
          f"featurised (reasons above); no file written", file=sys.stderr)
    return 1


def run(argv: Sequence[str] | None = None) -> None:
    command.run_tool(main, usage=USAGE, module="cryknn.featurize", define_flags=define_flags,
                     argv=argv)


if __name__ == "__main__":
    run()
