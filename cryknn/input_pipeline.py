"""From a dataset of structures to labelled atoms and training batches: `prepare(config)`.

  atom tables of every split (cryknn.features: featurised once, then cached)
    -> element choice (the most abundant in train, or an explicit list), labels 0..C-1;
       atoms of other elements are left out, not lumped together
    -> a per-element cap on training atoms (the graph model: a soft cap, as class
       weights), class weights
    -> batches: fixed-size numpy batches of atoms with a 0/1 mask, so a last partial batch
       pads instead of recompiling (`AtomBatches`); or packs of whole structures for the
       graph model (`GraphBatches`, cryknn.graph_batch).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterator

import numpy as np

from cryknn import config as config_lib
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import families
from cryknn import features
from cryknn import graph_batch
from cryknn import nearcopies
from cryknn import parallel

# ----------------------------------------------------------------------------
# Atom selection, labels and class weights.


def element_counts(atomic_number: np.ndarray) -> np.ndarray:
    """(119,) int64 atoms per atomic number (index 0 unused)."""
    return np.bincount(atomic_number, minlength=elements_lib.NUM_ELEMENTS + 1)


def choose_elements(counts: np.ndarray, *, num_elements: int = 20,
                    elements: str | None = None) -> list[int]:
    """Atomic numbers to classify: an explicit 'C,N,O' list, else the most abundant ones.

    counts: (119,) training atoms per atomic number. Raises SelectionError when the data
    cannot provide what was asked (an element absent, more elements than it has); what
    needs no data (symbols, at least 2 elements) config.validate checks.
    """
    available = int(np.count_nonzero(counts[1:]))
    if elements:  # symbols and list length were checked by config.validate
        chosen = elements_lib.parse_element_list(elements)
        missing = [elements_lib.symbol(z) for z in chosen if counts[z] == 0]
        if missing:
            raise errors.SelectionError(f"--elements: no training atoms of {', '.join(missing)}")
        return chosen
    if num_elements > available:
        raise errors.SelectionError(f"--num_elements={num_elements} but the training split "
                                    f"has only {available} elements")
    order = np.argsort(-counts[1:], kind="stable") + 1
    return [int(z) for z in order[:num_elements]]


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

    table: features.AtomTable
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
    if dataset.startswith(features.TOY_PREFIX):
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
    record = features.dataset_record(config.dataset, config.data_dir,
                                     build_if_missing=process_count == 1,
                                     manual_dir=config.manual_dir)
    limit = record["build_info"].get("limit")
    if limit is not None:
        log(f"note: {config.dataset} is a partial build (only the first {limit} CIF files); "
            f"rebuild it without --limit for real results")
    tables = {split: features.load_features(
                  config.dataset, split, config.k, fingerprint=record["fingerprint"],
                  data_dir=config.data_dir, process_index=process_index,
                  process_count=process_count, log=log)
              for split in features.SPLITS}
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


def _labelled(table: features.AtomTable, rows: np.ndarray, labels: np.ndarray) -> LabelledAtoms:
    return LabelledAtoms(table, rows, labels[table.atomic_number[rows]])


# ----------------------------------------------------------------------------
# Batches.


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def gather_inputs(table: features.AtomTable, rows: np.ndarray, spec: config_lib.InputSpec) -> dict:
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
        self._scratch: dict[int, tuple] = {}

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

    def _row_to_slot(self, atoms: LabelledAtoms) -> np.ndarray:
        """(A,) int64 all -1: `pack_arrays`' table row -> slot map, one per table, kept
        (each call restores it): a fresh one per batch cost a pass over every training
        atom (25 MB for CoRE MOF) at every step."""
        key = id(atoms.table)
        if key not in self._scratch:  # the table stays alive with its map
            self._scratch[key] = (atoms.table, np.full(len(atoms.table), -1, np.int64))
        return self._scratch[key][1]

    def _batch(self, atoms: LabelledAtoms, packs: list) -> dict:
        scratch = self._row_to_slot(atoms)
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


