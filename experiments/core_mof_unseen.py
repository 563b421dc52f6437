"""Fresh held-out sets of real MOFs: the CIFs of another CoRE MOF archive (embedded
core-mof package) whose family (CSD refcode, `cryknn.families.family_of`) has no structure
in the build of the training dataset (CoRE MOF 2019-ASR: its splits.csv), nor in the
archives named by --exclude_archives; written to a folder for experiments/checker.py
--cifs (which also leaves out near-copies of any structure of the build) or heldout.py.

    python experiments/core_mof_unseen.py [--data_dir=D] --out=FOLDER            # 2014
    python experiments/core_mof_unseen.py --archive=2019-FSR --exclude_archives=2014 \
        --out=FOLDER    # frameworks only in 2019's all-solvent-removed set, not in 2014

Same kind of structure as the training data, none seen by any model or choice here. Biases
to keep in mind: CoRE MOF 2019 was curated again from the CSD, so some 2014 frameworks may
be absent from it for a reason (a structure its curation rejected); the 2019-FSR files
have every solvent removed, bound ones too, so their metals can lack ligands that a
2019-ASR structure keeps.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (the repository on sys.path)


def families_in(splits_csv: str | os.PathLike) -> set[str]:
    """The families of a dataset build's splits.csv."""
    with open(splits_csv, newline="") as f:
        return {row["family"] for row in csv.DictReader(f)}


def absent(members: Iterable[tuple[str, bytes]], known: set[str], seen: list[int]
           ) -> Iterable[tuple[str, bytes]]:
    """The (member name, CIF bytes) whose file's family is not in `known`; counts every
    member read in seen[0]."""
    from cryknn import families

    for name, data in members:
        seen[0] += 1
        if families.family_of(families.file_stem(name)) not in known:
            yield name, data


def families_of_archive(version: str) -> set[str]:
    """The families of every CIF in a CoRE MOF archive (file names only, no parsing)."""
    from cryknn import cif, families

    return {families.family_of(families.file_stem(name))
            for name, _ in cif.iter_tar_cifs(cif.core_mof_archive(version))}


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("archive", "2014", "The CoRE MOF archive to take fresh CIFs from.")
    flags.DEFINE_list("exclude_archives", [], "CoRE MOF archives whose families are left "
                      "out too (sets already looked at).")
    flags.DEFINE_string("dataset", "crystal_structures/core_mof_2019_asr",
                        "The training dataset whose families are left out.")
    flags.DEFINE_string("data_dir", None, "Where the training dataset is built.")
    flags.DEFINE_string("out", None, "Folder to write the CIFs to (must not exist).")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import cif, datasets, errors, nearcopies

    FLAGS = flags.FLAGS
    if not FLAGS.out:
        raise errors.ConfigError("--out is required: the folder to write the CIFs to")
    out = Path(FLAGS.out)
    if out.exists():
        raise errors.ConfigError(f"--out {out} exists; give a new folder")
    splits = Path(datasets.dataset_dir(FLAGS.dataset, FLAGS.data_dir)) / nearcopies.SPLITS_CSV
    if not splits.is_file():
        raise errors.DataError(f"{splits} not found: build {FLAGS.dataset} first "
                               f"(python -m cryknn.data build)")
    known, seen = families_in(splits), [0]
    for version in FLAGS.exclude_archives:
        known |= families_of_archive(version)
    # Written under a temporary name, renamed when complete: a stopped run leaves no
    # folder that looks finished.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    written = 0
    for name, data in absent(cif.iter_tar_cifs(cif.core_mof_archive(FLAGS.archive)), known, seen):
        (partial / os.path.basename(name)).write_bytes(data)
        written += 1
    partial.rename(out)
    left_out = " or ".join([FLAGS.dataset, *FLAGS.exclude_archives])
    print(f"{written} of {seen[0]} CoRE MOF {FLAGS.archive} CIFs belong to no family of "
          f"{left_out}; written to {out}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/core_mof_unseen.py",
                     define_flags=define_flags)
