"""From a TFDS dataset of structures to per-atom training batches.

  structures (cryknn.data.load_split, this process's part of a split)
    -> k-NN distances (cryknn.featurize), cached per (dataset, k, split, process) as .npz
    -> atom selection: chosen elements only (others are excluded, not lumped), a per-element
       cap on training atoms, labels 0..C-1
    -> fixed-size numpy batches with a 0/1 mask, so the last partial batch pads instead of
       recompiling.

Feature cache layout: `<data_dir>/cryknn_features/<dataset>/k<K>/<split>.npz` (suffix
`.p<i>of<n>` per process when there are several) holding
  distances (A, K) float32, atomic_number (A,) int32, structure_index (A,) int32,
  site_label (A,) bytes, structure_id (S,) str (one per structure; structure_index points in).
A cache built for a larger K serves any k <= K (the first k columns are the k-NN).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Callable, Iterator

from absl import logging
import numpy as np

from cryknn import elements as elements_lib

CLASS_WEIGHTINGS = ("none", "inverse_frequency", "sqrt_inverse_frequency")


class SelectionError(ValueError):
    """Element selection that the data cannot satisfy (unknown symbol, too many elements...)."""


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Per-atom k-NN features of one split (or a selection of its atoms).

    Attributes:
      distances: (A, k) float32 ascending neighbour distances (angstrom).
      atomic_number: (A,) int32 element of each atom.
      structure_index: (A,) int32 row of `structure_id` each atom belongs to.
      site_label: (A,) bytes CIF site label of each atom.
      structure_id: (S,) str ids `<file stem>:<block>`.
    """

    distances: np.ndarray
    atomic_number: np.ndarray
    structure_index: np.ndarray
    site_label: np.ndarray
    structure_id: np.ndarray

    def __len__(self) -> int:
        return int(self.atomic_number.shape[0])

    @property
    def k(self) -> int:
        return int(self.distances.shape[1])

    def take(self, index: np.ndarray) -> "FeatureSet":
        """The atoms at `index` (structure table kept whole)."""
        return dataclasses.replace(
            self,
            distances=self.distances[index],
            atomic_number=self.atomic_number[index],
            structure_index=self.structure_index[index],
            site_label=self.site_label[index],
        )

    def first_k(self, k: int) -> "FeatureSet":
        return dataclasses.replace(self, distances=np.ascontiguousarray(self.distances[:, :k]))

    def atom_structure_ids(self) -> np.ndarray:
        """(A,) str structure id of every atom."""
        return self.structure_id[self.structure_index]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, distances=self.distances, atomic_number=self.atomic_number,
                 structure_index=self.structure_index, site_label=self.site_label,
                 structure_id=self.structure_id)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureSet":
        with np.load(path) as f:
            return cls(**{name: f[name] for name in
                          ("distances", "atomic_number", "structure_index", "site_label",
                           "structure_id")})

    @classmethod
    def concatenate(cls, parts: list["FeatureSet"]) -> "FeatureSet":
        offsets = np.cumsum([0] + [len(p.structure_id) for p in parts[:-1]])
        return cls(
            distances=np.concatenate([p.distances for p in parts]),
            atomic_number=np.concatenate([p.atomic_number for p in parts]),
            structure_index=np.concatenate(
                [p.structure_index + o for p, o in zip(parts, offsets)]).astype(np.int32),
            site_label=np.concatenate([p.site_label for p in parts]),
            structure_id=np.concatenate([p.structure_id for p in parts]),
        )


def from_neighbours(ids, numbers, labels, distances) -> FeatureSet:
    """FeatureSet from per-structure lists: ids (S,), numbers/labels/distances per structure."""
    counts = [len(z) for z in numbers]
    k = distances[0].shape[1] if distances else 1
    return FeatureSet(
        distances=(np.concatenate(distances).astype(np.float32) if distances
                   else np.zeros((0, k), np.float32)),
        atomic_number=(np.concatenate(numbers).astype(np.int32) if numbers
                       else np.zeros((0,), np.int32)),
        structure_index=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
        site_label=(np.concatenate([np.asarray(x).astype(np.bytes_) for x in labels])
                    if labels else np.zeros((0,), "S1")),
        structure_id=np.asarray([str(i) for i in ids], dtype=str),
    )


# ----------------------------------------------------------------------------
# Featurisation with an on-disk cache.


def default_data_dir() -> str:
    """TFDS' default data directory (~/tensorflow_datasets unless TFDS_DATA_DIR is set)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def cache_dir(data_dir: str | None, dataset: str) -> str:
    return os.path.join(data_dir or default_data_dir(), "cryknn_features",
                        dataset.replace(":", "_"))


def cache_path(data_dir: str | None, dataset: str, k: int, split: str,
               process_index: int = 0, process_count: int = 1) -> str:
    suffix = "" if process_count == 1 else f".p{process_index}of{process_count}"
    return os.path.join(cache_dir(data_dir, dataset), f"k{k}", f"{split}{suffix}.npz")


def find_cache(data_dir, dataset, k, split, process_index=0, process_count=1) -> str | None:
    """Cache file for the smallest K >= k that exists, or None."""
    pattern = cache_path(data_dir, dataset, 0, split, process_index, process_count)
    pattern = pattern.replace(f"{os.sep}k0{os.sep}", f"{os.sep}k*{os.sep}")
    best = None
    for path in glob.glob(pattern):
        m = re.search(r"k(\d+)$", os.path.dirname(path))
        if m and int(m.group(1)) >= k and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), path)
    return best[1] if best else None


def featurize_examples(examples, k: int, *, progress: Callable[[int], None] | None = None,
                       chunk: int = 4096) -> FeatureSet:
    """k-NN features of dataset examples (dicts with id, lattice, frac, numbers, labels).

    Structures go to the featuriser `chunk` at a time: large enough for full device batches
    of each size bucket, small enough to bound memory on huge datasets.
    """
    from cryknn import featurize  # heavy import, only where features are computed

    ids, numbers, labels, distances = [], [], [], []
    batch = []

    def flush():
        if not batch:
            return
        neigh = featurize.featurize_arrays([b["lattice"] for b in batch],
                                           [b["frac"] for b in batch], k, progress=progress)
        distances.extend(n.distances for n in neigh)
        batch.clear()

    for ex in examples:
        if len(ex["numbers"]) == 0:
            continue
        ids.append(_text(ex["id"]))
        numbers.append(np.asarray(ex["numbers"], np.int32))
        labels.append(np.asarray([_text(s) for s in ex["labels"]]))
        batch.append({"lattice": np.asarray(ex["lattice"], np.float64),
                      "frac": np.asarray(ex["frac"], np.float64)})
        if len(batch) >= chunk:
            flush()
    flush()
    if not ids:
        return from_neighbours([], [], [], [np.zeros((0, k), np.float32)])
    return from_neighbours(ids, numbers, labels, distances)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_features(dataset: str, split: str, k: int, *, data_dir: str | None = None,
                  process_index: int = 0, process_count: int = 1,
                  log: Callable[[str], None] = logging.info) -> FeatureSet:
    """k-NN features of this process's part of a split, from the cache or computed and cached.

    Builds the TFDS dataset first if it is missing (cryknn.data).
    """
    path = find_cache(data_dir, dataset, k, split, process_index, process_count)
    if path is not None:
        features = FeatureSet.load(path)
        log(f"{split}: {len(features)} atoms of {len(features.structure_id)} structures "
            f"from the feature cache {path}")
        return features.first_k(k)

    from cryknn import data  # TFDS and TF only when features must be computed

    start = time.time()
    # Several processes must not build one dataset at once: multi-host runs need it built
    # beforehand (python -m cryknn.data build ...).
    examples = data.load_split(dataset=dataset, split=split, data_dir=data_dir,
                               build_if_missing=process_count == 1,
                               per_process=process_count > 1)
    done = [0, time.time()]

    def progress(atoms):
        done[0] += atoms
        if time.time() - done[1] > 10:
            done[1] = time.time()
            log(f"{split}: featurised {done[0]} atoms ({time.time() - start:.0f} s)")

    features = featurize_examples(examples, k, progress=progress)
    path = cache_path(data_dir, dataset, k, split, process_index, process_count)
    features.save(path)
    log(f"{split}: featurised {len(features)} atoms of {len(features.structure_id)} structures "
        f"at k={k} in {time.time() - start:.1f} s; cached in {path}")
    return features


# ----------------------------------------------------------------------------
# Atom selection, labels and class weights.


def element_counts(atomic_number: np.ndarray) -> np.ndarray:
    """(119,) int64 atoms per atomic number (index 0 unused)."""
    return np.bincount(atomic_number, minlength=elements_lib.NUM_ELEMENTS + 1)


def choose_elements(counts: np.ndarray, *, num_elements: int = 20,
                    elements: str | None = None) -> list[int]:
    """Atomic numbers to classify: an explicit 'C,N,O' list, else the most abundant ones.

    counts: (119,) training atoms per atomic number. Raises SelectionError when the data
    cannot provide what was asked (unknown symbol, element absent, too many elements).
    """
    available = int(np.count_nonzero(counts[1:]))
    if elements:
        try:
            chosen = elements_lib.parse_element_list(elements)
        except elements_lib.UnknownElementError as e:
            raise SelectionError(f"--elements: {e}") from None
        missing = [elements_lib.symbol(z) for z in chosen if counts[z] == 0]
        if missing:
            raise SelectionError(f"--elements: no training atoms of {', '.join(missing)}")
    else:
        if num_elements < 2:
            raise SelectionError(f"--num_elements must be at least 2, got {num_elements}")
        if num_elements > available:
            raise SelectionError(f"--num_elements={num_elements} but the training split has "
                                 f"only {available} elements")
        order = np.argsort(-counts[1:], kind="stable") + 1
        chosen = [int(z) for z in order[:num_elements]]
    if len(chosen) < 2:
        raise SelectionError("need at least 2 elements to classify")
    return chosen


def label_table(element_list: list[int]) -> np.ndarray:
    """(119,) int32 class index of each atomic number, -1 for elements not classified."""
    table = np.full(elements_lib.NUM_ELEMENTS + 1, -1, np.int32)
    table[np.asarray(element_list)] = np.arange(len(element_list), dtype=np.int32)
    return table


def select_atoms(atomic_number: np.ndarray, element_list: list[int], *,
                 max_per_element: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of atoms of the chosen elements, at most `max_per_element` of each (random).

    Returns sorted int64 indices; atoms of other elements are left out.
    """
    rng = np.random.default_rng(seed)
    keep = []
    for z in element_list:
        idx = np.flatnonzero(atomic_number == z)
        if max_per_element and len(idx) > max_per_element:
            idx = rng.choice(idx, size=max_per_element, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
    """(C,) float32 per-class loss weights from (C,) training atoms per class.

    'none': 1; 'inverse_frequency': 1/n_c; 'sqrt_inverse_frequency': 1/sqrt(n_c).
    Normalised so the mean weight over training atoms is 1 (sum_c w_c n_c = sum_c n_c),
    which keeps the loss scale (and a good learning rate) independent of the mode.
    """
    counts = np.asarray(counts, np.float64)
    if mode not in CLASS_WEIGHTINGS:
        raise SelectionError(f"unknown class weighting {mode!r}; choose one of "
                             f"{', '.join(CLASS_WEIGHTINGS)}")
    safe = np.maximum(counts, 1.0)
    w = {"none": np.ones_like(safe), "inverse_frequency": 1.0 / safe,
         "sqrt_inverse_frequency": 1.0 / np.sqrt(safe)}[mode]
    w = w * counts.sum() / max((w * counts).sum(), 1e-12)
    return w.astype(np.float32)


# ----------------------------------------------------------------------------
# Batches.


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  start: int = 0) -> Iterator[dict]:
    """Shuffled training batches of one epoch, dropping the remainder.

    x: (A, k) float32, y: (A,) int32. The order depends only on (seed, epoch), so a resumed
    run continues with the same batches; `start` skips that many batches.
    Yields {'distances': (B, k), 'label': (B,), 'mask': (B,)}.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(y))
    for b in range(start, num_batches(len(y), batch_size, drop_remainder=True)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield {"distances": x[idx], "label": y[idx], "mask": np.ones(len(idx), np.float32)}


def eval_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int) -> Iterator[dict]:
    """All atoms in order, the last batch padded (mask 0) to full size."""
    n = len(x)
    for b in range(num_batches(n, batch_size, drop_remainder=False)):
        sl = slice(b * batch_size, min((b + 1) * batch_size, n))
        size = sl.stop - sl.start
        pad = batch_size - size
        xb = np.pad(x[sl], ((0, pad), (0, 0)), mode="edge" if size else "constant")
        yb = np.zeros(batch_size, np.int32) if y is None else np.pad(y[sl], (0, pad))
        mask = np.concatenate([np.ones(size, np.float32), np.zeros(pad, np.float32)])
        yield {"distances": xb, "label": yb, "mask": mask}


# ----------------------------------------------------------------------------
# A toy data set for tests and benchmarks that must run without the real one.

# Typical first-neighbour distances (angstrom) per atomic number; the rest get 2.0 + Z/100.
_TOY_FIRST_DISTANCE = {1: 1.0, 6: 1.4, 7: 1.35, 8: 1.25, 29: 1.95, 30: 2.0}


def toy_features(atomic_numbers, atoms_per_element, k: int, *, seed: int = 0,
                 atoms_per_structure: int = 20, noise: float = 0.05) -> FeatureSet:
    """A FeatureSet with element-dependent k-NN distances (learnable, not physical).

    Atom j of element Z gets sorted distances d_i = f(Z) * (1 + 0.3 i) + noise, grouped into
    structures `toy<n>:toy<n>` of `atoms_per_structure` atoms with site labels like 'C3'.
    """
    rng = np.random.default_rng(seed)
    zs = np.repeat(np.asarray(atomic_numbers, np.int32), atoms_per_element)
    rng.shuffle(zs)
    first = np.array([_TOY_FIRST_DISTANCE.get(int(z), 2.0 + z / 100) for z in zs])
    d = first[:, None] * (1 + 0.3 * np.arange(k))[None] + noise * rng.standard_normal((len(zs), k))
    d = np.sort(np.abs(d), axis=1).astype(np.float32)
    n_struct = -(-len(zs) // atoms_per_structure)
    index = (np.arange(len(zs)) // atoms_per_structure).astype(np.int32)
    labels = np.array([f"{elements_lib.symbol(z)}{i % atoms_per_structure + 1}"
                       for i, z in enumerate(zs)]).astype(np.bytes_)
    ids = np.array([f"toy{seed}_{i}:toy{seed}_{i}" for i in range(n_struct)])
    return FeatureSet(distances=d, atomic_number=zs, structure_index=index, site_label=labels,
                      structure_id=ids)


def write_toy_cache(data_dir: str, dataset: str, k: int, atomic_numbers,
                    atoms_per_element=(300, 60, 60)) -> None:
    """Feature caches of train/validation/test toy splits, so a run needs no dataset."""
    for i, (split, n) in enumerate(zip(("train", "validation", "test"), atoms_per_element)):
        toy_features(atomic_numbers, n, k, seed=i).save(cache_path(data_dir, dataset, k, split))
