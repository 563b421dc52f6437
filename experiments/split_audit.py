"""How many test structures have a near-copy in train or validation, under the family split
and under the near-copy split a build uses.

    python experiments/split_audit.py [--dataset=crystal_structures/core_mof_2019_asr]
        [--data_dir=D] [--volume_tolerance=0.01] [--json=F]

The audit's test is deliberately not the builder's rule: two structures count as a
near-copy when they have the same composition (reduced formula) and cell volumes per atom
within --volume_tolerance (1 %). Reads the built dataset (every split) and its splits.csv,
whose `family_split` column is the split the family rule alone gave and `split` the one
the build uses.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def leaks(composition: np.ndarray, volume: np.ndarray, split: np.ndarray,
          tolerance: float) -> dict:
    """Test structures with a same-composition structure of volume per atom within
    `tolerance` (relative) in train or validation, and the number of such pairs."""
    by_key = defaultdict(list)
    for i, key in enumerate(composition.tolist()):
        by_key[key].append(i)
    flagged, pairs = set(), 0
    for members in by_key.values():
        idx = np.asarray(members)
        if idx.size < 2:
            continue
        for i in idx[split[idx] == "test"]:
            close = np.abs(volume[idx] - volume[i]) <= tolerance * volume[i]
            others = idx[close & (split[idx] != "test")]
            if others.size:
                flagged.add(int(i))
                pairs += int(others.size)
    tests = int(np.sum(split == "test"))
    return {"test_structures": tests, "with_near_copy": len(flagged),
            "fraction": len(flagged) / max(tests, 1), "pairs": pairs}


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("dataset", "crystal_structures/core_mof_2019_asr", "A built dataset.")
    flags.DEFINE_string("data_dir", None, "Its TFDS data dir.")
    flags.DEFINE_float("volume_tolerance", 0.01, "Relative volume-per-atom tolerance.")
    flags.DEFINE_string("json", None, "Write the audit here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import datasets, nearcopies

    FLAGS = flags.FLAGS
    rows = {r["structure_id"]: r for r in nearcopies.read_splits_csv(
        str(Path(datasets.dataset_dir(FLAGS.dataset, FLAGS.data_dir)) / nearcopies.SPLITS_CSV))}
    ids, composition, volume = [], [], []
    for split in ("train", "validation", "test"):
        for s in datasets.load_structures(FLAGS.dataset, split, FLAGS.data_dir,
                                          build_if_missing=False):
            ids.append(s.id)
            composition.append(nearcopies.composition_key(s.numbers))
            volume.append(s.volume / max(s.num_atoms, 1))
    composition, volume = np.asarray(composition), np.asarray(volume)
    result = {"dataset": FLAGS.dataset, "volume_tolerance": FLAGS.volume_tolerance}
    for rule, column in (("family", "family_split"), ("near_copy_groups", "split")):
        split = np.asarray([rows[i][column] for i in ids])
        result[rule] = leaks(composition, volume, split, FLAGS.volume_tolerance)
        result[rule]["split_sizes"] = {s: int(np.sum(split == s))
                                       for s in ("train", "validation", "test")}
    for rule in ("family", "near_copy_groups"):
        r = result[rule]
        print(f"{rule:>16}: {r['with_near_copy']} of {r['test_structures']} test structures "
              f"({100 * r['fraction']:.1f} %) have a same-composition structure with volume "
              f"per atom within {100 * FLAGS.volume_tolerance:g} % in train or validation "
              f"({r['pairs']} pairs); split sizes {r['split_sizes']}")
    if FLAGS.json:
        common.write_json(FLAGS.json, result)
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/split_audit.py",
                     define_flags=define_flags)
