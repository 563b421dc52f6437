"""From a dataset of structures to labelled atoms and training batches: `prepare(config)`.

  structures (cryknn.datasets.load_split, this process's part of a split)
    -> k-NN distances and neighbour rows (cryknn.neighbours), cached per (dataset build, k,
       split, process) as .npz
    -> element choice (the most abundant in train, or an explicit list), labels 0..C-1;
       atoms of other elements are left out, not lumped together
    -> a per-element cap on training atoms, class weights
    -> fixed-size numpy batches with a 0/1 mask, so a last partial batch pads instead of
       recompiling.

Feature cache:
`<data_dir>/cryknn_features/<dataset>/<build fingerprint>/v<CACHE_VERSION>/k<K>/<split>.npz`
(suffix `.p<i>of<n>` per process when there are several). The fingerprint identifies the
dataset build (`cryknn.datasets.build_fingerprint`), so a rebuilt or different dataset is
never served features of another; the version changes with what a cache holds (2: with
`neighbour_vector`), so older caches are recomputed, never misread. A cache built for a
larger K serves any k <= K (the first k columns are the k-NN). Dataset names `toy/<name>`
are synthetic feature tables written by `write_toy_cache`, for tests and benchmarks that
must run without a real dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from cryknn import config as config_lib
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import families
from cryknn import graph_batch
from cryknn import nearcopies
from cryknn import parallel
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
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = [np.unique(np.asarray(s, np.int64), return_inverse=True)[1] for s in site_index]
    sizes = np.asarray([int(r.max()) + 1 if r.size else 0 for r in rows], np.int64)
    site = np.concatenate([r + o for r, o in zip(rows, np.cumsum(sizes) - sizes)])
    i, j = np.nonzero(table.distances < COINCIDENT_SITE_DISTANCE)
    other = table.neighbour_index[i, j]
    same = table.atomic_number[i] == table.atomic_number[other]
    if not same.any():
        return site
    n = int(sizes.sum())
    a, b = site[i[same]], site[other[same]]
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)[site]


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
                               f"(write one with input_pipeline.write_toy_cache)")
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
        except errors.UnknownElementError as e:
            raise errors.SelectionError(f"--elements: {e}") from None
        missing = [elements_lib.symbol(z) for z in chosen if counts[z] == 0]
        if missing:
            raise errors.SelectionError(f"--elements: no training atoms of {', '.join(missing)}")
    else:
        if num_elements < 2:
            raise errors.SelectionError(f"--num_elements must be at least 2, got {num_elements}")
        if num_elements > available:
            raise errors.SelectionError(f"--num_elements={num_elements} but the training split "
                                        f"has only {available} elements")
        order = np.argsort(-counts[1:], kind="stable") + 1
        chosen = [int(z) for z in order[:num_elements]]
    if len(chosen) < 2:
        raise errors.SelectionError("need at least 2 elements to classify")
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


def class_weights(counts: np.ndarray, mode: str, cap: int | None = None) -> np.ndarray:
    """(C,) float32 per-class loss weights from (C,) training atoms per class.

    'none': 1; 'inverse_frequency': 1/n_c; 'sqrt_inverse_frequency': 1/sqrt(n_c).
    cap: every atom carries a loss, but each class weighs what `cap` atoms of it would
    (a soft per-element cap: the same class balance as selecting at most `cap` atoms
    per class, in expectation): w_c = w(m_c) m_c / n_c with m_c = min(n_c, cap).
    Normalised so the mean weight over training atoms is 1 (sum_c w_c n_c = sum_c n_c),
    which keeps the loss scale (and a good learning rate) independent of the mode.
    """
    counts = np.asarray(counts, np.float64)
    if mode not in config_lib.CLASS_WEIGHTINGS:
        raise errors.ConfigError(f"unknown class weighting {mode!r}; choose one of "
                                 f"{', '.join(config_lib.CLASS_WEIGHTINGS)}")
    safe = np.maximum(counts, 1.0)
    kept = np.minimum(safe, cap) if cap else safe
    w = {"none": np.ones_like(safe), "inverse_frequency": 1.0 / kept,
         "sqrt_inverse_frequency": 1.0 / np.sqrt(kept)}[mode] * kept / safe
    w = w * counts.sum() / max((w * counts).sum(), 1e-12)
    return w.astype(np.float32)


# ----------------------------------------------------------------------------
# Prepared data: what training needs, from one call.


@dataclasses.dataclass(frozen=True)
class LabelledAtoms:
    """The selected atoms of one split on this process.

    Attributes:
      table: every atom of the split (this process's part); neighbours are looked up here.
      rows: (A,) int64 rows of `table` that are selected.
      labels: (A,) int32 class index of each selected atom.
    """

    table: AtomTable
    rows: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def distances(self) -> np.ndarray:
        """(A, k) float32 distances of the selected atoms."""
        return self.table.distances[self.rows]

    def subset(self, index: np.ndarray) -> "LabelledAtoms":
        """The selected atoms at positions `index` of this selection."""
        return LabelledAtoms(self.table, self.rows[index], self.labels[index])


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Everything training takes from the data, for this process.

    Counts marked 'all processes' are sums over processes (the same on every process).
    """

    element_list: list[int]  # atomic numbers in class order
    symbols: list[str]
    train: LabelledAtoms  # capped at max_per_element per element (random)
    validation: LabelledAtoms  # every atom of the chosen elements
    test: LabelledAtoms
    monitor: LabelledAtoms  # validation atoms, at most monitor_per_element per element
    train_counts: np.ndarray  # (C,) selected training atoms per class, all processes
    validation_support: np.ndarray  # (C,) validation atoms per class, all processes
    class_weights: np.ndarray  # (C,) float32
    dataset: dict  # {'fingerprint', 'build_info'} of the dataset build
    load_seconds: float
    groups: dict = dataclasses.field(default_factory=dict)  # structure id -> near-copy group

    def group_names(self, atoms: LabelledAtoms) -> np.ndarray:
        """(A,) str the near-copy group (else the family) of each selected atom's structure:
        the unit a family bootstrap resamples."""
        per_structure = np.asarray([self.groups.get(sid) or families.family_of(sid)
                                    for sid in atoms.table.structure_id.tolist()], dtype=str)
        return per_structure[atoms.table.structure_index[atoms.rows]]


def structure_groups(dataset: str, data_dir: str | None) -> dict[str, str]:
    """{structure id: near-copy group} from the build's splits.csv; {} where there is none
    (toy data, builds before 1.1.0)."""
    if dataset.startswith(TOY_PREFIX):
        return {}
    from cryknn import datasets

    path = os.path.join(datasets.dataset_dir(dataset, data_dir), nearcopies.SPLITS_CSV)
    if not os.path.isfile(path):
        return {}
    return {row["structure_id"]: row["group"] for row in nearcopies.read_splits_csv(path)}


def prepare(config: config_lib.Config, log: Callable[[str], None] = parallel.log) -> PreparedData:
    """Loads (or featurises and caches) every split, chooses the elements, selects and
    labels atoms, and computes class weights: what `cryknn.train` needs, in one call."""
    import jax

    start = time.time()
    process_index, process_count = jax.process_index(), jax.process_count()
    record = dataset_record(config.dataset, config.data_dir,
                            build_if_missing=process_count == 1, manual_dir=config.manual_dir)
    limit = record["build_info"].get("limit")
    if limit is not None:
        log(f"note: {config.dataset} is a partial build (only the first {limit} CIF files); "
            f"rebuild it without --limit for real results")
    tables = {split: load_features(config.dataset, split, config.k,
                                   fingerprint=record["fingerprint"], data_dir=config.data_dir,
                                   process_index=process_index, process_count=process_count,
                                   log=log)
              for split in SPLITS}
    counts = parallel.global_sum(element_counts(tables["train"].atomic_number))
    element_list = choose_elements(counts, num_elements=config.num_elements,
                                   elements=config.elements)
    labels = label_table(element_list)
    # The graph model computes whole structures anyway: every atom carries a loss, and the
    # cap limits each element's share of the loss instead of its atoms (`capped_weights`).
    soft_cap = config_lib.input_spec(config).reads == "graph"
    cap = (config.max_per_element // process_count
           if config.max_per_element and not soft_cap else None)
    train_rows = select_atoms(tables["train"].atomic_number, element_list,
                              max_per_element=cap, seed=config.seed + 1000 * process_index)
    splits = {"train": _labelled(tables["train"], train_rows, labels)}
    for split in ("validation", "test"):
        rows = np.flatnonzero(labels[tables[split].atomic_number] >= 0)
        splits[split] = _labelled(tables[split], rows, labels)
    num_classes = len(element_list)
    train_counts = parallel.global_sum(np.bincount(splits["train"].labels, minlength=num_classes))
    monitor = splits["validation"].subset(select_atoms(
        splits["validation"].labels, list(range(num_classes)),
        max_per_element=max(config.monitor_per_element // process_count, 1), seed=config.seed + 7))
    symbols = [elements_lib.symbol(z) for z in element_list]
    log(f"elements ({len(symbols)}): {','.join(symbols)}; training atoms per element: "
        + ", ".join(f"{s} {n}" for s, n in zip(symbols, train_counts)))
    return PreparedData(
        element_list=element_list, symbols=symbols, monitor=monitor,
        train_counts=train_counts, class_weights=class_weights(
            train_counts, config.class_weighting,
            cap=config.max_per_element if soft_cap else None),
        validation_support=parallel.global_sum(
            np.bincount(splits["validation"].labels, minlength=num_classes)),
        dataset=record, load_seconds=time.time() - start,
        groups=structure_groups(config.dataset, config.data_dir), **splits)


def _labelled(table: AtomTable, rows: np.ndarray, labels: np.ndarray) -> LabelledAtoms:
    return LabelledAtoms(table, rows, labels[table.atomic_number[rows]])


# ----------------------------------------------------------------------------
# Batches.


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def gather_inputs(table: AtomTable, rows: np.ndarray, spec: config_lib.InputSpec) -> dict:
    """Model inputs of the atoms at `rows` (B,) of `table`:

      'distances': (B, k) float32, each atom's own k-NN distances;
    and for h = 1..spec.hops (the periodic k-NN graph, neighbours at each hop in the
    order of the featuriser, images resolved to their motif atom):
      'neighbour_distances_<h>': (B, k**h, k) float32, the distances of the neighbours at hop h;
      'neighbour_elements_<h>': (B, k**h) int32 their atomic numbers (masked-atom mode only),
        0 (unknown) wherever the node is the atom itself, one of its periodic images, or
        another atom of its site (`AtomTable.site`): a neighbour's neighbour is often the
        atom again, and must not give its element away.
    Never the element of the atom itself.
    """
    rows = np.asarray(rows)
    inputs = {"distances": table.distances[rows, :spec.k]}
    index = rows[:, None]
    for hop in range(1, spec.hops + 1):
        index = table.neighbour_index[index, :spec.k].reshape(len(rows), -1)
        inputs[f"neighbour_distances_{hop}"] = table.distances[index, :spec.k]
        if spec.neighbour_elements:
            own = (index == rows[:, None] if table.site is None
                   else table.site[index] == table.site[rows][:, None])
            inputs[f"neighbour_elements_{hop}"] = np.where(
                own, 0, table.atomic_number[index]).astype(np.int32)
    return inputs


def filler_inputs(spec: config_lib.InputSpec, batch_size: int) -> dict:
    """Model inputs of `batch_size` dummy atoms (init shapes; a process with no atoms left
    still steps with the others)."""
    inputs = {"distances": np.ones((batch_size, spec.k), np.float32)}
    for hop in range(1, spec.hops + 1):
        inputs[f"neighbour_distances_{hop}"] = np.ones((batch_size, spec.k ** hop, spec.k),
                                                       np.float32)
        if spec.neighbour_elements:
            inputs[f"neighbour_elements_{hop}"] = np.ones((batch_size, spec.k ** hop), np.int32)
    return inputs


def epoch_batches(atoms: LabelledAtoms, batch_size: int, spec: config_lib.InputSpec, *,
                  seed: int, epoch: int, start: int = 0) -> Iterator[dict]:
    """Shuffled training batches of one epoch, dropping the remainder.

    The order depends only on (seed, epoch), so a resumed run continues with the same
    batches; `start` skips that many batches. Yields {'inputs': `gather_inputs`,
    'label': (B,) int32, 'mask': (B,) float32}.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(atoms))
    for b in range(start, num_batches(len(atoms), batch_size, drop_remainder=True)):
        index = order[b * batch_size:(b + 1) * batch_size]
        yield {"inputs": gather_inputs(atoms.table, atoms.rows[index], spec),
               "label": atoms.labels[index], "mask": np.ones(len(index), np.float32)}


def eval_batches(atoms: LabelledAtoms, batch_size: int,
                 spec: config_lib.InputSpec) -> Iterator[dict]:
    """All selected atoms in order, the last batch padded (mask 0) to full size."""
    n = len(atoms)
    for b in range(num_batches(n, batch_size, drop_remainder=False)):
        index = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        pad = batch_size - len(index)
        padded = np.pad(index, (0, pad), mode="edge" if len(index) else "constant")
        yield {"inputs": gather_inputs(atoms.table, atoms.rows[padded], spec),
               "label": atoms.labels[padded],
               "mask": (np.arange(batch_size) < len(index)).astype(np.float32)}


class AtomBatches:
    """Batches of atoms (models that read each atom's own distances, or its tree gathered
    on the host): `batch_size` atoms per batch on this process."""

    def __init__(self, spec: config_lib.InputSpec, batch_size: int):
        self.spec, self.batch_size = spec, batch_size

    def steps_per_epoch(self, atoms: LabelledAtoms) -> int:
        return len(atoms) // self.batch_size

    def epoch(self, atoms: LabelledAtoms, *, seed: int, epoch: int,
              start: int = 0) -> Iterator[dict]:
        return epoch_batches(atoms, self.batch_size, self.spec, seed=seed, epoch=epoch,
                             start=start)

    def evaluation(self, atoms: LabelledAtoms) -> Iterator[tuple[dict, np.ndarray]]:
        """(batch, (B,) position in `atoms` of each row, -1 on padding) in order."""
        for b, batch in enumerate(eval_batches(atoms, self.batch_size, self.spec)):
            position = b * self.batch_size + np.arange(self.batch_size)
            yield batch, np.where(batch["mask"] > 0, position, -1)

    def filler(self) -> dict:
        return {"inputs": filler_inputs(self.spec, self.batch_size),
                "label": np.zeros(self.batch_size, np.int32),
                "mask": np.zeros(self.batch_size, np.float32)}


# A structure holding a rare element comes back at most this many times per epoch.
MAX_REPEAT = 8


def class_repeats(counts: np.ndarray, cap: int | None,
                  max_repeat: float = MAX_REPEAT) -> np.ndarray:
    """(C,) how often per epoch a structure holding a class-c atom is trained on:
    cap / n_c, between 1 and max_repeat (no cap: 1). With every atom carrying a loss, this
    shows rare elements about as often as a per-element cap of `cap` atoms over
    max_repeat epochs would (repeat-factor sampling), without more passes over C and H."""
    counts = np.maximum(np.asarray(counts, np.float64), 1.0)
    if not cap:
        return np.ones_like(counts)
    return np.clip(cap / counts, 1.0, max_repeat)


class GraphBatches:
    """Batches of `packs` packs of `pack_size` node slots on this process
    (`cryknn.graph_batch`): whole structures, or crops holding every loss atom's receptive
    field. An epoch shuffles the units (structures, crops) by (seed, epoch), each as often
    as the most repeated class among its loss atoms asks (`class_repeats`, stochastically
    rounded), and packs them in that order; every epoch has the same number of steps (the
    first epoch's: a later epoch that packs tighter pads with empty packs, one that packs
    looser drops its last packs, as a fixed-size batcher drops its remainder)."""

    def __init__(self, spec: config_lib.InputSpec, pack_size: int, packs: int,
                 repeats: np.ndarray | None = None):
        self.spec, self.pack_size, self.packs = spec, pack_size, packs
        self.repeats = repeats
        self._units: dict[int, tuple] = {}

    def units(self, atoms: LabelledAtoms) -> list:
        return self._unit_record(atoms)[1]

    def _unit_record(self, atoms: LabelledAtoms) -> tuple:
        """(atoms, units, (U,) repeat of each unit), cached per selection."""
        key = id(atoms)
        if key not in self._units:  # the selection object stays alive with its units
            units = graph_batch.make_units(
                atoms.table.neighbour_index, atoms.table.structure_index, atoms.rows,
                self.spec.receptive_hops, self.pack_size - 1)
            repeat = np.ones(len(units))
            if self.repeats is not None:
                repeat = np.asarray([self.repeats[atoms.labels[u.loss]].max() for u in units])
            self._units[key] = (atoms, units, repeat)
        return self._units[key]

    def _epoch_packs(self, atoms: LabelledAtoms, seed: int, epoch: int) -> list:
        _, units, repeat = self._unit_record(atoms)
        rng = np.random.default_rng([seed, epoch])
        whole = np.floor(repeat)
        copies = (whole + (rng.random(len(units)) < repeat - whole)).astype(np.int64)
        order = rng.permutation(np.repeat(np.arange(len(units)), copies))
        return graph_batch.pack_units([units[i] for i in order], self.pack_size - 1)

    def steps_per_epoch(self, atoms: LabelledAtoms) -> int:
        return len(self._epoch_packs(atoms, 0, 0)) // self.packs

    def epoch(self, atoms: LabelledAtoms, *, seed: int, epoch: int,
              start: int = 0) -> Iterator[dict]:
        packs = self._epoch_packs(atoms, seed, epoch)
        steps = self.steps_per_epoch(atoms)
        for b in range(start, steps):
            yield self._batch(atoms, packs[b * self.packs:(b + 1) * self.packs])

    def evaluation(self, atoms: LabelledAtoms) -> Iterator[tuple[dict, np.ndarray]]:
        """(batch, (G, N) position in `atoms` of each loss node, -1 elsewhere) in order."""
        packs = graph_batch.pack_units(self.units(atoms), self.pack_size - 1)
        for b in range(0, len(packs), self.packs):
            batch = self._batch(atoms, packs[b:b + self.packs])
            yield batch, batch.pop("position")

    def filler(self) -> dict:
        return {"inputs": graph_batch.filler(self.pack_size, self.spec.k, self.packs,
                                             with_elements=self.spec.neighbour_elements),
                "label": np.zeros((self.packs, self.pack_size), np.int32),
                "mask": np.zeros((self.packs, self.pack_size), np.float32)}

    def _batch(self, atoms: LabelledAtoms, packs: list) -> dict:
        scratch = np.full(len(atoms.table), -1, np.int64)
        arrays = [graph_batch.pack_arrays(atoms.table, units, self.pack_size,
                                          with_elements=self.spec.neighbour_elements,
                                          scratch=scratch) for units in packs]
        empty = self.packs - len(arrays)
        if empty:
            arrays += [graph_batch.empty_pack(self.pack_size, self.spec.k,
                                              with_elements=self.spec.neighbour_elements)
                       ] * empty
        inputs, position = graph_batch.stack(arrays)
        loss = position >= 0
        return {"inputs": inputs, "label": np.where(loss, atoms.labels[position], 0).astype(
                    np.int32), "mask": loss.astype(np.float32), "position": position}


def batches_for(spec: config_lib.InputSpec, batch_size: int, devices: int,
                local_devices: int, repeats: np.ndarray | None = None
                ) -> AtomBatches | GraphBatches:
    """The batcher of a model reading `spec`, for a global batch of `batch_size` atoms
    (graph: node slots, one pack per device, structures repeated per `class_repeats`) over
    `devices` devices, `local_devices` of them on this process."""
    if spec.reads == "graph":
        return GraphBatches(spec, batch_size // devices, local_devices, repeats)
    return AtomBatches(spec, batch_size * local_devices // devices)


def example_inputs(spec: config_lib.InputSpec, size: int = 1):
    """Model inputs of `size` dummy atoms (graph: one pack of `size` + 1 slots, at least
    two): the shapes models are initialised from."""
    if spec.reads == "graph":
        return graph_batch.filler(max(size + 1, 2), spec.k, 1,
                                  with_elements=spec.neighbour_elements)
    return filler_inputs(spec, size)


# ----------------------------------------------------------------------------
# A toy data set for tests and benchmarks that must run without the real one.

# Typical first-neighbour distances (angstrom) per atomic number; the rest get 2.0 + Z/100.
_TOY_FIRST_DISTANCE = {1: 1.0, 6: 1.4, 7: 1.35, 8: 1.25, 29: 1.95, 30: 2.0}


def toy_features(atomic_numbers, atoms_per_element, k: int, *, seed: int = 0,
                 atoms_per_structure: int = 20, noise: float = 0.05) -> AtomTable:
    """An AtomTable with element-dependent k-NN distances (learnable, not physical).

    Atom j of element Z gets sorted distances d_i = f(Z) * (1 + 0.3 i) + noise, grouped into
    structures `toy<n>:toy<n>` of `atoms_per_structure` atoms with site labels like 'C3';
    neighbours are random atoms of the same structure, in random directions.
    """
    rng = np.random.default_rng(seed)
    zs = np.repeat(np.asarray(atomic_numbers, np.int32), atoms_per_element)
    rng.shuffle(zs)
    first = np.array([_TOY_FIRST_DISTANCE.get(int(z), 2.0 + z / 100) for z in zs])
    d = first[:, None] * (1 + 0.3 * np.arange(k))[None] + noise * rng.standard_normal((len(zs), k))
    d = np.sort(np.abs(d), axis=1).astype(np.float32)
    n_struct = -(-len(zs) // atoms_per_structure)
    index = (np.arange(len(zs)) // atoms_per_structure).astype(np.int32)
    first_row = index * atoms_per_structure
    size = np.minimum(atoms_per_structure, len(zs) - first_row)
    neighbours = first_row[:, None] + rng.integers(0, 1 << 30, (len(zs), k)) % size[:, None]
    labels = np.array([f"{elements_lib.symbol(z)}{i % atoms_per_structure + 1}"
                       for i, z in enumerate(zs)]).astype(np.bytes_)
    ids = np.array([f"toy{seed}_{i}:toy{seed}_{i}" for i in range(n_struct)])
    directions = rng.standard_normal((len(zs), k, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    return AtomTable(distances=d, neighbour_index=neighbours.astype(np.int32), atomic_number=zs,
                     structure_index=index, site_label=labels, structure_id=ids,
                     neighbour_vector=(directions * d[..., None]).astype(np.float32))


def write_toy_cache(data_dir: str, dataset: str, k: int, atomic_numbers,
                    atoms_per_element=(300, 60, 60), process_count: int = 1) -> None:
    """Feature caches of train/validation/test toy splits (dataset 'toy/<name>'), one per
    process, so a run needs no real dataset."""
    if not dataset.startswith(TOY_PREFIX):
        raise ValueError(f"toy dataset names start with {TOY_PREFIX!r}, got {dataset!r}")
    for p in range(process_count):
        for i, (split, n) in enumerate(zip(SPLITS, atoms_per_element)):
            toy_features(atomic_numbers, n, k, seed=10 * p + i).save(
                cache_path(data_dir, dataset, TOY_FINGERPRINT, k, split, p, process_count))
