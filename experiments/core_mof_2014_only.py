"""A fresh held-out set of real MOFs: the CoRE MOF 2014 CIFs (embedded core-mof archive)
whose family (CSD refcode, `cryknn.families.family_of`) has no structure in the build of
the training dataset (CoRE MOF 2019-ASR: its splits.csv), written to a folder for
experiments/checker.py --cifs (which also leaves out near-copies of any structure of the
build) or heldout.py.

    python experiments/core_mof_2014_only.py [--data_dir=D] --out=FOLDER

Same kind of structure as the training data, none seen by any model or choice here. One
bias to keep in mind: CoRE MOF 2019 was curated again from the CSD, so some of these
frameworks may be absent from it for a reason (a structure its curation rejected).
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


def define_flags() -> None:
    from absl import flags

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
    # Written under a temporary name, renamed when complete: a stopped run leaves no
    # folder that looks finished.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    written = 0
    for name, data in absent(cif.iter_tar_cifs(cif.core_mof_archive("2014")), known, seen):
        (partial / os.path.basename(name)).write_bytes(data)
        written += 1
    partial.rename(out)
    print(f"{written} of {seen[0]} CoRE MOF 2014 CIFs belong to no family of "
          f"{FLAGS.dataset}; written to {out}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/core_mof_2014_only.py",
                     define_flags=define_flags)
