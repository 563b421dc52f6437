"""The atom table: every atom's exact periodic k-NN, one row per unit-cell atom.

One table serves the three places that read features: `cryknn featurize` writes it (in the
per-atom form of `AtomTable.per_atom_arrays`), training reads it from a per-dataset cache
(`load_features`), and scoring builds it from the structures it is given (`atom_table`).

  structures -> k-NN distances, neighbour rows and displacement vectors (cryknn.neighbours)
             -> AtomTable: neighbours resolved to rows of the table, sites numbered across it

Feature cache:
`<data_dir>/cryknn_features/<dataset>/<build fingerprint>/v<CACHE_VERSION>/k<K>/<split>.npz`
(suffix `.p<i>of<n>` per process when there are several). The fingerprint identifies the
dataset build (`cryknn.datasets.build_fingerprint`), so a rebuilt or different dataset is
never served features of another; the version changes with what a cache holds (2: with
`neighbour_vector`), so older caches are recomputed, never misread. A cache built for a
larger K serves any k <= K (the first k columns are the k-NN). Dataset names `toy/<name>`
are cache-only: synthetic tables written straight into the cache (tests and benchmarks that
must run without a real dataset; `tests/toy_data.py` writes them).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from cryknn import cif
from cryknn import errors
from cryknn import util


SPLITS = ("train", "validation", "test")
TOY_PREFIX = "toy/"
TOY_FINGERPRINT = "synthetic"
CACHE_VERSION = 2  # 2: neighbour_vector
_TABLE_FIELDS = ("distances", "neighbour_index", "atomic_number", "structure_index",
                 "site_label", "structure_id")
# Same-element atoms closer than this (angstrom) are one site: left-over disorder (two
# positions of one atom) must not show an atom its own element in masked-atom mode.
COINCIDENT_SITE_DISTANCE = 0.7
_OPTIONAL_FIELDS = ("site", "neighbour_vector")


@dataclasses.dataclass(frozen=True)
class AtomTable:
    """Per-atom k-NN features of one split (this process's part of it).

    Attributes:
      distances: (A, K) float32 ascending neighbour distances (angstrom).
      neighbour_index: (A, K) int32 row of this table holding each neighbour's motif atom
        (periodic images resolved to their motif atom).
      atomic_number: (A,) int32 element of each atom.
      structure_index: (A,) int32 row of `structure_id` each atom belongs to.
      site_label: (A,) bytes CIF site label of each atom.
      structure_id: (S,) str ids `<file stem>:<block>`.
      site: (A,) int64 the site each atom stands for, numbered across the table: its
        symmetry copies (one CIF atom-site row) and same-element atoms closer than
        COINCIDENT_SITE_DISTANCE share it; or None: every atom its own site (toy data).
        Masked-atom inputs hide the elements of every atom of the same site.
      neighbour_vector: (A, K, 3) float32 displacement from each atom to each neighbour's
        image (angstrom, Cartesian in its structure's lattice frame), or None (toy tables).
    """

    distances: np.ndarray
    neighbour_index: np.ndarray
    atomic_number: np.ndarray
    structure_index: np.ndarray
    site_label: np.ndarray
    structure_id: np.ndarray
    site: np.ndarray | None = None
    neighbour_vector: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.atomic_number.shape[0])

    @property
    def k(self) -> int:
        return int(self.distances.shape[1])

    def first_k(self, k: int) -> "AtomTable":
        """The table at k <= K: the first k neighbours of every atom."""
        vectors = self.neighbour_vector
        return dataclasses.replace(
            self, distances=np.ascontiguousarray(self.distances[:, :k]),
            neighbour_index=np.ascontiguousarray(self.neighbour_index[:, :k]),
            neighbour_vector=None if vectors is None else np.ascontiguousarray(vectors[:, :k]))

    def atom_structure_ids(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(A,) str structure id of every atom (or of the atoms at `rows`)."""
        index = self.structure_index if rows is None else self.structure_index[rows]
        return self.structure_id[index]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with util.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **{name: getattr(self, name) for name in
                             _TABLE_FIELDS + _OPTIONAL_FIELDS if getattr(self, name) is not None})

    @classmethod
    def load(cls, path: str) -> "AtomTable":
        try:
            with np.load(path) as f:
                return cls(**{name: f[name] for name in _TABLE_FIELDS},
                           **{name: f[name] for name in _OPTIONAL_FIELDS if name in f.files})
        except (OSError, KeyError, ValueError) as e:
            raise errors.DataFormatError(f"feature cache {path} is unreadable ({e}); delete "
                                         f"it to recompute") from None

    def per_atom_arrays(self) -> dict[str, np.ndarray]:
        """The table as `cryknn featurize` writes it: every field per atom (structure_id
        repeated on each of its atoms), strings as fixed-width str (no pickle to load)."""
        arrays = {"distances": self.distances, "neighbour_index": self.neighbour_index,
                  "atomic_number": self.atomic_number,
                  "structure_id": self.atom_structure_ids().astype(str),
                  "site_label": np.char.decode(self.site_label.astype(np.bytes_), "utf-8")}
        arrays.update({name: getattr(self, name) for name in _OPTIONAL_FIELDS
                       if getattr(self, name) is not None})
        return arrays


    @classmethod
    def from_structures(cls, ids, numbers, labels, distances, indices, k: int,
                        site_index=None, vectors=None) -> "AtomTable":
        """A table from per-structure lists: ids (S,); numbers, labels, site_index (N_s,)
        and distances, indices (N_s, k) per structure, indices into the structure's own
        atoms (site_index None: every atom its own site); optional vectors (N_s, k, 3) per
        structure (neighbour_vector)."""
        counts = np.asarray([len(z) for z in numbers], np.int64)
        offsets = np.cumsum(counts) - counts
        if not ids:
            return cls(np.zeros((0, k), np.float32), np.zeros((0, k), np.int32),
                       np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, "S1"),
                       np.zeros(0, str), neighbour_vector=None if vectors is None else
                       np.zeros((0, k, 3), np.float32))
        table = cls(
            distances=np.concatenate(distances).astype(np.float32),
            neighbour_index=np.concatenate([i + o for i, o in zip(indices, offsets)]
                                           ).astype(np.int32),
            atomic_number=np.concatenate(numbers).astype(np.int32),
            structure_index=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
            site_label=np.concatenate([np.char.encode(np.asarray(x, dtype=str), "utf-8")
                                       for x in labels]),
            structure_id=np.asarray([str(i) for i in ids], dtype=str),
            neighbour_vector=None if vectors is None else
            np.concatenate(vectors).astype(np.float32),
        )
        if site_index is None:
            site_index = [np.arange(n) for n in counts]
        return dataclasses.replace(table, site=table_sites(table, site_index))


def table_sites(table: AtomTable, site_index) -> np.ndarray:
    """(A,) int64 site of every atom of `table`, numbered across the table.

    site_index: per structure, (N_s,) CIF atom-site row of each atom (symmetry copies
    share it). Same-element atoms closer than COINCIDENT_SITE_DISTANCE (read from the
    table's k-NN) join one site.
    """
    rows = [np.unique(np.asarray(s, np.int64), return_inverse=True)[1] for s in site_index]
    sizes = np.asarray([int(r.max()) + 1 if r.size else 0 for r in rows], np.int64)
    site = np.concatenate([r + o for r, o in zip(rows, np.cumsum(sizes) - sizes)])
    i, j = np.nonzero(table.distances < COINCIDENT_SITE_DISTANCE)
    other = table.neighbour_index[i, j]
    same = table.atomic_number[i] == table.atomic_number[other]
    if not same.any():
        return site
    return connected_components(int(sizes.sum()), site[i[same]], site[other[same]])[site]


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) int64 component of each of n nodes joined by the edges a[e] - b[e], numbered
    0, 1, ... in order of each component's smallest node (as scipy's connected_components
    numbers them). Minimum labels spread along the edges with pointer jumping, in numpy:
    no scipy.sparse import (0.08 s of `cryknn predict`'s start-up)."""
    label = np.arange(n, dtype=np.int64)
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # each label points at a node with a label no larger
        if np.array_equal(new, label):
            return np.unique(label, return_inverse=True)[1].astype(np.int64)
        label = new



def concatenate(tables: Sequence[AtomTable]) -> AtomTable:
    """One table of the atoms of `tables` in order (rows, structures and sites renumbered).
    Optional fields are kept where every table has them."""
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise ValueError("concatenate needs at least one table")
    rows = np.cumsum([0] + [len(t) for t in tables])
    structures = np.cumsum([0] + [len(t.structure_id) for t in tables])
    joined = {
        "distances": np.concatenate([t.distances for t in tables]),
        "neighbour_index": np.concatenate([t.neighbour_index + np.int32(r)
                                           for t, r in zip(tables, rows)]),
        "atomic_number": np.concatenate([t.atomic_number for t in tables]),
        "structure_index": np.concatenate([t.structure_index + np.int32(n)
                                           for t, n in zip(tables, structures)]),
        "site_label": np.concatenate([t.site_label for t in tables]),
        "structure_id": np.concatenate([t.structure_id for t in tables])}
    if all(t.neighbour_vector is not None for t in tables):
        joined["neighbour_vector"] = np.concatenate([t.neighbour_vector for t in tables])
    if all(t.site is not None for t in tables):
        sizes = [int(t.site.max()) + 1 if len(t) else 0 for t in tables]
        offsets = np.cumsum([0] + sizes[:-1])
        joined["site"] = np.concatenate([t.site + o for t, o in zip(tables, offsets)])
    return AtomTable(**joined)


# ----------------------------------------------------------------------------
# Tables of given structures (scoring, `cryknn featurize`).


def table_from(structures: Sequence[cif.Structure], found: Sequence, k: int) -> AtomTable:
    """The table of `structures` from their k-NN already computed (`found`: one
    `neighbours.Neighbours` per structure). Sites as in training: symmetry copies of a
    CIF row, and coincident same-element atoms."""
    return AtomTable.from_structures(
        [s.id for s in structures], [s.numbers for s in structures],
        [s.labels for s in structures], [n.distances for n in found],
        [n.indices for n in found], k, [s.site_index for s in structures],
        [n.vectors for n in found])


def atom_table(structures: Sequence[cif.Structure], k: int) -> AtomTable:
    """The k-NN features of the structures' atoms, as one table (neighbours in its rows).
    Raises FeaturizeError for the first structure that cannot be featurised."""
    from cryknn import neighbours  # JAX: only where features are computed

    good, skips = neighbours.split_featurizable(structures)
    if skips:
        raise errors.FeaturizeError(f"{skips[0].file} [{skips[0].block}]: {skips[0].reason}")
    return table_from(structures, neighbours.featurize(structures, k), k)


# ----------------------------------------------------------------------------
# Featurisation with an on-disk cache.


def dataset_record(dataset: str, data_dir: str | None, *, build_if_missing: bool,
                   manual_dir: str | None = None) -> dict:
    """{'fingerprint', 'build_info'} of the dataset build features are computed from.

    Builds a missing TFDS dataset first when build_if_missing (one process only; cif_dir
    builds from manual_dir).
    """
    if dataset.startswith(TOY_PREFIX):
        return {"fingerprint": TOY_FINGERPRINT, "build_info": {"dataset": dataset}}
    from cryknn import datasets

    try:
        return datasets.build_fingerprint(dataset, data_dir)
    except errors.DataError:
        if not build_if_missing:
            raise
    datasets.build(dataset, data_dir, manual_dir=manual_dir)
    return datasets.build_fingerprint(dataset, data_dir)


def cache_path(data_dir: str | None, dataset: str, fingerprint: str, k: int, split: str,
               process_index: int = 0, process_count: int = 1) -> str:
    from cryknn import datasets

    suffix = "" if process_count == 1 else f".p{process_index}of{process_count}"
    return os.path.join(data_dir or datasets.default_data_dir(), "cryknn_features",
                        dataset.replace(":", "_"), fingerprint, f"v{CACHE_VERSION}", f"k{k}",
                        f"{split}{suffix}.npz")


def find_cache(data_dir, dataset, fingerprint, k, split, process_index=0,
               process_count=1) -> str | None:
    """Cache file for the smallest K >= k that exists, or None."""
    pattern = cache_path(data_dir, dataset, fingerprint, 0, split, process_index, process_count)
    pattern = pattern.replace(f"{os.sep}k0{os.sep}", f"{os.sep}k*{os.sep}")
    best = None
    for path in glob.glob(pattern):
        m = re.search(r"k(\d+)$", os.path.dirname(path))
        if m and int(m.group(1)) >= k and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), path)
    return best[1] if best else None


def featurize_examples(examples: Iterable[dict], k: int, *,
                       progress: Callable[[int], None] | None = None,
                       chunk: int = 4096) -> AtomTable:
    """k-NN features of dataset examples (dicts with id, lattice, frac, numbers, labels and,
    when the dataset records it, site_index).

    Structures go to the featuriser `chunk` at a time: large enough for full device batches
    of each size bucket, small enough to bound memory on huge datasets.
    """
    from cryknn import neighbours  # JAX: only where features are computed

    ids, numbers, labels, distances, indices, sites, vectors = [], [], [], [], [], [], []
    for batch in util.chunked((ex for ex in examples if len(ex["numbers"])), chunk):
        found = neighbours.featurize_arrays(
            [np.asarray(ex["lattice"], np.float64) for ex in batch],
            [np.asarray(ex["frac"], np.float64) for ex in batch], k, progress=progress)
        for ex, nb in zip(batch, found):
            ids.append(_text(ex["id"]))
            numbers.append(np.asarray(ex["numbers"], np.int32))
            labels.append(np.asarray([_text(s) for s in ex["labels"]]))
            distances.append(nb.distances)
            indices.append(nb.indices)
            sites.append(ex.get("site_index", np.arange(len(ex["numbers"]))))
            vectors.append(nb.vectors)
    return AtomTable.from_structures(ids, numbers, labels, distances, indices, k,
                                     site_index=sites, vectors=vectors)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_features(dataset: str, split: str, k: int, *, fingerprint: str,
                  data_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                  log: Callable[[str], None] = print) -> AtomTable:
    """k-NN features of this process's part of a split, from the cache or computed and cached.

    `fingerprint` is the dataset build's (`dataset_record`); the dataset must be built.
    """
    path = find_cache(data_dir, dataset, fingerprint, k, split, process_index, process_count)
    if path is not None:
        table = AtomTable.load(path)
        log(f"{split}: {len(table)} atoms of {len(table.structure_id)} structures from the "
            f"feature cache {path}")
        return table.first_k(k)
    if dataset.startswith(TOY_PREFIX):
        raise errors.DataError(f"no feature cache of the toy dataset {dataset} at k >= {k} "
                               f"(tests/toy_data.py writes them)")
    from cryknn import datasets

    start = time.time()
    examples = datasets.load_split(dataset, split, data_dir, build_if_missing=False,
                                   per_process=process_count > 1)
    done = [0, time.time()]

    def progress(atoms):
        done[0] += atoms
        if time.time() - done[1] > 10:
            done[1] = time.time()
            log(f"{split}: featurised {done[0]} atoms ({time.time() - start:.0f} s)")

    table = featurize_examples(examples, k, progress=progress)
    path = cache_path(data_dir, dataset, fingerprint, k, split, process_index, process_count)
    table.save(path)
    log(f"{split}: featurised {len(table)} atoms of {len(table.structure_id)} structures at "
        f"k={k} in {time.time() - start:.1f} s; cached in {path}")
    return table
