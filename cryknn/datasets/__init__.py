"""Datasets of crystal structures (TFDS): build, load, and read what a build recorded.

  from cryknn import datasets
  datasets.build("crystal_structures/core_mof_2019_asr", data_dir)
  for example in datasets.load_split("crystal_structures/core_mof_2019_asr", "train"): ...

The TFDS builder lives in `cryknn/datasets/crystal_structures/` and is registered with
TFDS by `get_builder`. Names are imported on first use: importing this package (or its
`crystal_structures` names) imports neither TensorFlow nor the CIF reader.
"""

from __future__ import annotations

import importlib

_API = {
    "cryknn.datasets.building": (
        "build", "build_fingerprint", "check_built", "dataset_dir", "default_data_dir",
        "get_builder", "is_built", "parse_dataset_name", "read_build_info", "read_skips",
        "summarize_build"),
    "cryknn.datasets.crystal_structures": (
        "BUILD_INFO_JSON", "CONFIG_NAMES", "DATASET_NAME", "DEFAULT_DATASET",
        "ELEMENT_STATS_JSON", "ENV_LIMIT", "ENV_WORKERS", "REMOVED_CSV", "SKIPPED_CSV"),
    "cryknn.datasets.loading": ("element_stats", "load_split", "load_structures"),
    "cryknn.datasets.stats": ("format_stats", "plot_stats", "top_elements"),
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'cryknn.datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
