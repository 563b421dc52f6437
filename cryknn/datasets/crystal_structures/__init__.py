"""The `crystal_structures` TFDS dataset: one example per crystal structure."""

from cryknn.datasets.crystal_structures.crystal_structures_dataset_builder import Builder  # noqa: F401
