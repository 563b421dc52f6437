"""Datasets of crystal structures (TFDS): build, load, and read what a build recorded.

  from cryknn import datasets
  datasets.build("crystal_structures/core_mof_2019_asr", data_dir)
  for example in datasets.load_split("crystal_structures/core_mof_2019_asr", "train"): ...

The TFDS builder lives in `cryknn/datasets/crystal_structures/` and is registered with
TFDS by `get_builder` (so `import cryknn.datasets` does not import TensorFlow).
"""

from cryknn.datasets.building import (  # noqa: F401
    build, build_fingerprint, check_built, dataset_dir, default_data_dir, get_builder,
    is_built, parse_dataset_name, read_build_info, read_skips, summarize_build)
from cryknn.datasets.crystal_structures import (  # noqa: F401
    BUILD_INFO_JSON, CONFIG_NAMES, DATASET_NAME, DEFAULT_DATASET, ELEMENT_STATS_JSON,
    ENV_LIMIT, ENV_WORKERS, SKIPPED_CSV)
from cryknn.datasets.loading import element_stats, load_split, load_structures  # noqa: F401
from cryknn.datasets.stats import format_stats, plot_stats, top_elements  # noqa: F401
