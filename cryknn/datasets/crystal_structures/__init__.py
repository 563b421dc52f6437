"""The `crystal_structures` TFDS dataset: one example per crystal structure.

This package module holds only names and file layout (no TensorFlow import); the builder
itself is `crystal_structures_dataset_builder.Builder`, registered with TFDS when
`cryknn.datasets.get_builder` imports it.
"""

from __future__ import annotations

DATASET_NAME = "crystal_structures"
CONFIG_NAMES = ("core_mof_2019_asr", "core_mof_2014", "cif_dir")
DEFAULT_DATASET = f"{DATASET_NAME}/core_mof_2019_asr"
VERSION = "1.1.0"  # the builder's version: the folder a build is written to

# Files written beside a built dataset (<data_dir>/crystal_structures/<config>/<version>/).
SKIPPED_CSV = "skipped.csv"  # file, block, reason: everything the reader could not read
ELEMENT_STATS_JSON = "element_stats.json"  # per split: structures, atoms, per element
BUILD_INFO_JSON = "build_info.json"  # what it was built from, counts, seconds taken
SKIP_FIELDS = ("file", "block", "reason")
REMOVED_CSV = "removed.csv"  # atoms the reading policies removed, per structure and policy
REMOVED_FIELDS = ("structure_id", "source", "policy", "atoms")
# cif_dir builds beside the default: their near-copies of default structures (nearcopies.py).
COPIES_OF_DEFAULT_CSV = "copies_of_default.csv"
COPIES_FIELDS = ("structure_id", "default_structure_id", "default_split")

# Environment variables read by the builder (a builder kwarg of the same name wins).
ENV_LIMIT = "CRYKNN_DATA_LIMIT"  # read only the first N CIF files / archive members
ENV_WORKERS = "CRYKNN_DATA_WORKERS"  # parsing processes (0 or 1: parse in this process)
