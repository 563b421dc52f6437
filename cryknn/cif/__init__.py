"""Crystal structures and CIF reading (gemmi; ase and pymatgen in and out).

A `Structure` is a periodic point set: a lattice plus a motif of typed atoms in
fractional coordinates. Readers return structures together with `Skip` records
(file, block, reason) for everything they could not read, so nothing is lost silently.

The package's names, from its modules (each imports only those above it):
  structure  `Structure`, `Skip`, `as_structures` (one or many; Structure, ase.Atoms,
             pymatgen Structure), `is_single`
  options    reading policies `ReadOptions`, `RemovalCounter`, `POLICY_REMOVALS`,
             `summarize_skips`
  values     CIF values (unquoting, numbers), `BlockSkip`
  cell       the unit cell of a block, close atom pairs
  symmetry   symmetry operations and the images of the sites
  sites      the atom-site loop (elements, occupancies)
  disorder   the disorder policies
  reader     one block -> Structure; documents, files, folders: `read_cif`,
             `read_cif_text`, `read_file_bytes`, `iter_cif_paths`, `iter_structures`
  sources    CoRE MOF archives, tar archives, pyxtal's database: `iter_core_mof`,
             `core_mof_archive`, `iter_tar_cifs`, `read_pyxtal_db`, `pyxtal_db_path`
The largest file read is `reader.MAX_FILE_BYTES` (the tools' --max_file_mb sets it
there: it is not re-exported, a copy here would not take the setting).
"""

from cryknn.cif.options import (DISORDER_POLICIES, POLICY_REMOVALS, ReadOptions,
                                RemovalCounter, skip_reason_kind, summarize_skips)
from cryknn.cif.reader import (iter_cif_paths, iter_structures, read_cif, read_cif_text,
                               read_file_bytes)
from cryknn.cif.sources import (CORE_MOF_VERSIONS, core_mof_archive, iter_core_mof,
                                iter_tar_cifs, pyxtal_db_path, read_pyxtal_db)
from cryknn.cif.structure import Skip, Structure, as_structure, as_structures, is_single

__all__ = [
    "CORE_MOF_VERSIONS", "DISORDER_POLICIES", "POLICY_REMOVALS", "ReadOptions",
    "RemovalCounter", "Skip", "Structure", "as_structure", "as_structures", "core_mof_archive",
    "is_single", "iter_cif_paths", "iter_core_mof", "iter_structures", "iter_tar_cifs",
    "pyxtal_db_path", "read_cif", "read_cif_text", "read_file_bytes", "read_pyxtal_db",
    "skip_reason_kind", "summarize_skips",
]
