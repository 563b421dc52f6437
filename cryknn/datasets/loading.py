"""Reading a built `crystal_structures` dataset: examples, Structure records, statistics."""

from __future__ import annotations

import logging as py_logging
import os
import re
from typing import Iterable, Iterator

import numpy as np

from cryknn import cif
from cryknn import errors
from cryknn import families
from cryknn import util
from cryknn.datasets import building
from cryknn.datasets import crystal_structures as names


def element_stats(dataset: str = names.DEFAULT_DATASET, data_dir: str | None = None) -> dict:
    """The element statistics stored with a built dataset (element_stats.json).

    {'dataset': ..., 'splits': {split: {'structures': int, 'atoms': int,
     'elements': {symbol: {'atoms': int, 'structures': int}}}}, 'data_dir': ...}, elements
    most atoms first. `cryknn.datasets.top_elements(stats, n)` gives the n most abundant.
    """
    builder = building.ready_builder(dataset, data_dir, build_if_missing=False)
    stats = building.read_json(os.path.join(builder.data_dir, names.ELEMENT_STATS_JSON))
    if stats is None:
        raise errors.DataError(f"{builder.data_dir} has no {names.ELEMENT_STATS_JSON}")
    stats["data_dir"] = os.fspath(builder.data_dir)
    return stats


def load_split(dataset: str = names.DEFAULT_DATASET, split: str = "train",
               data_dir: str | None = None, *, build_if_missing: bool = True,
               per_process: bool = False, manual_dir: str | None = None,
               shuffle_files: bool = False) -> Iterator[dict]:
    """Streams the examples of a split as dicts of numpy arrays and Python strings.

    Keys: id, family, source (str); lattice (3, 3) float64; frac (N, 3) float64;
    numbers (N,) int32; labels (N,) str; occupancies (N,) float32; site_index (N,) int32
    (the CIF atom-site row of each atom); num_atoms int. The split is the structure's
    near-copy group's (the build's splits.csv says which structures it moved).
    per_process: read only this JAX process's part (`tfds.split_for_jax_process`), so each
      host of a multi-host run reads its own shard.
    build_if_missing: build the dataset first (cif_dir needs manual_dir); otherwise a
      missing dataset raises DataError.
    """
    if split not in families.SPLITS and not re.match(r"^(train|validation|test)\[", split):
        raise errors.DataError(f"unknown split {split!r}: expected one of "
                               f"{', '.join(families.SPLITS)}")
    builder = building.ready_builder(dataset, data_dir, build_if_missing,
                                     manual_dir=manual_dir)
    base = split.split("[", 1)[0]
    if base not in builder.info.splits:
        raise errors.DataError(f"{dataset} has no {base!r} split (too few structures); it "
                               f"has {', '.join(builder.info.splits.keys())}")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:  # tf.data only feeds the host: keep TensorFlow off any accelerator JAX uses
        with util.stderr_silenced():  # (and quiet about the CUDA it does not find)
            tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    _drop_tfds_dtype_warning()
    if per_process:
        split = tfds.split_for_jax_process(split)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files)
    return _decoded(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


def load_structures(dataset: str = names.DEFAULT_DATASET, split: str = "train",
                    data_dir: str | None = None, **kwargs) -> Iterator[cif.Structure]:
    """Like load_split, as Structure records."""
    for ex in load_split(dataset, split, data_dir, **kwargs):
        yield cif.Structure(
            id=ex["id"], source=ex["source"], lattice=ex["lattice"], frac=ex["frac"],
            numbers=ex["numbers"], labels=ex["labels"], occupancies=ex["occupancies"],
            site_index=ex["site_index"])


class _DropMessage:
    """logging filter: drops records whose message contains a given text."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in str(record.msg)


def _drop_tfds_dtype_warning() -> None:
    """TFDS 4.9 warns about its own use of FeatureConnector.dtype when decoding raw bytes."""
    logger = py_logging.getLogger("absl")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("FeatureConnector.dtype` is deprecated"))


def _decoded(examples: Iterable[dict]) -> Iterator[dict]:
    for ex in examples:
        out = dict(ex)
        for key in ("id", "family", "source"):
            out[key] = ex[key].decode("utf-8")
        out["labels"] = _decode_labels(ex["labels"])
        out["num_atoms"] = int(ex["num_atoms"])
        yield out


def _decode_labels(labels: np.ndarray) -> np.ndarray:
    """(N,) bytes -> (N,) str; vectorised for ASCII labels (nearly all of them)."""
    raw = np.asarray(labels).astype(bytes)
    try:
        return raw.astype(str)
    except UnicodeDecodeError:
        return np.asarray([s.decode("utf-8", errors="replace") for s in raw], dtype=str)
