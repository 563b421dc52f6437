"""TFDS datasets of cryknn. Importing this package registers them with TFDS.

  import cryknn.datasets
  builder = tfds.builder("crystal_structures/core_mof_2019_asr", data_dir=...)
"""

from cryknn.datasets.crystal_structures import Builder as CrystalStructures  # noqa: F401
