"""Scoring structures with a trained model: how plausible is each site's element?

  model = load_model()                     # the shipped model (or load_model(workdir))
  model.predict_proba(structures)          # (num_atoms, num_classes) per structure
  model.score(structures)                  # per-site scores, as `cryknn predict` prints them

A site is one row of the CIF's atom-site loop; its symmetry copies are its atoms (a
structure that did not come from a CIF has one site per atom). For every site: the
element the model predicts, and p(given), the model's probability of the element the file
states, both averaged over the site's atoms. Per structure, the plausibility is the
geometric mean of p(given) over the atoms whose element the model knows (1 = the model
agrees everywhere). Physically absurd input (atoms on top of each other, atoms with no
neighbour in reach, occupancies above 1) is scored but flagged with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from cryknn import config as config_lib
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import input_pipeline
from cryknn import neighbours
from cryknn import saved_model
from cryknn import structures as structures_lib
from cryknn import util

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
DEFAULT_MODEL = "default"
CSV_COLUMNS = ("structure_id", "site_label", "given_element", "predicted_element",
               "p_predicted", "p_given", "multiplicity", "site_row", "atom_index",
               "structure_warnings")
# First-neighbour distances outside this range (angstrom) are flagged: no bond is shorter
# than 0.5 A (X-ray C-H is 0.93 A), and in no solid is the nearest atom 4 A away.
SANE_FIRST_NEIGHBOUR = (0.5, 4.0)


def pretrained_names() -> list[str]:
    if not os.path.isdir(PRETRAINED):
        return []
    return sorted(n for n in os.listdir(PRETRAINED)
                  if saved_model.exists(os.path.join(PRETRAINED, n)))


def load_model(workdir: str | None = None, name: str = DEFAULT_MODEL) -> "Model":
    """The model trained in `workdir`, or else the shipped pretrained model `name`."""
    if workdir is not None:
        from cryknn import checkpoints  # orbax: only for a workdir without an export

        return Model(checkpoints.load_trained(workdir), f"workdir {workdir}")
    folder = os.path.join(PRETRAINED, name)
    if not saved_model.exists(folder):
        raise errors.ModelError(f"no shipped model named {name!r}; shipped: "
                                f"{', '.join(pretrained_names()) or 'none'}")
    return Model(saved_model.load(folder), f"shipped model {name!r}")


@dataclasses.dataclass
class SiteScore:
    """One site (or, per atom, one atom) of one structure."""

    structure_id: str
    site_label: str  # the CIF label, with '#<row>' when several sites share it
    given: str  # element symbol in the file
    predicted: str
    p_predicted: float
    p_given: float | None  # None: the given element is not one the model knows
    multiplicity: int  # unit-cell atoms this site stands for
    site_row: int  # 1-based row of the atom-site loop
    atom_index: int | None = None  # per-atom rows: the atom's index in the unit cell


@dataclasses.dataclass
class StructureScore:
    structure_id: str
    sites: list[SiteScore]
    plausibility: float | None  # geometric mean of p(given) over modelled atoms
    modelled_atoms: int
    num_atoms: int
    warnings: list[str]

    def implausible(self, threshold: float) -> list[SiteScore]:
        return [s for s in self.sites if s.p_given is not None and s.p_given < threshold]


class Scores(list):
    """StructureScores, one per structure; `to_pandas()` gives one row per site."""

    def rows(self) -> list[dict]:
        return [dict(zip(CSV_COLUMNS, _csv_row(score, site))) for score in self
                for site in score.sites]

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError:
            raise errors.UserError("Scores.to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows(), columns=list(CSV_COLUMNS))


class Model:
    """A trained element predictor (geometry only, or masked-atom mode)."""

    def __init__(self, saved: saved_model.SavedModel, source: str):
        import jax

        self.saved = saved
        self.source = source
        self.spec = config_lib.input_spec(saved.config)
        apply = saved.model.apply
        self._probs = jax.jit(lambda params, inputs: jax.nn.softmax(
            apply({"params": params}, inputs, train=False)["logits"], -1))

    @property
    def elements(self) -> list[str]:
        """Element symbols in class order."""
        return self.saved.symbols

    @property
    def k(self) -> int:
        return self.saved.config.k

    @property
    def mode(self) -> str:
        return ("masked-atom (sees its neighbours' elements)" if self.spec.neighbour_elements
                else "geometry only")

    def describe(self) -> str:
        s = self.saved
        unfinished = ("" if s.total_steps is None or s.step is None or s.step >= s.total_steps
                      else f", training unfinished: step {s.step} of {s.total_steps}")
        notes = "".join(f"\n{note}" for note in s.info.get("notes", []))
        return (f"model {s.config.model} ({self.mode}; k={self.k}; elements "
                f"{','.join(self.elements)}) from {self.source}{unfinished}{notes}")

    def predict_proba(self, structures: Sequence[structures_lib.Structure],
                      batch_size: int = 4096) -> list[np.ndarray]:
        """(num_atoms, num_classes) probabilities per structure, atoms in structure order.
        Raises FeaturizeError for a structure whose cell cannot be featurised."""
        return self._predict(list(structures), batch_size)[0]

    def _predict(self, structures: list, batch_size: int):
        """(probabilities per structure, the structures' AtomTable)."""
        if not structures:
            return [], None
        table = atom_table(structures, self.k)
        probs = self.predict_table(table, batch_size=batch_size)
        if not np.all(np.isfinite(probs)):
            raise errors.ModelError(f"the {self.source} gives non-finite outputs: it is "
                                    f"damaged or diverged in training; retrain it")
        ends = np.cumsum([s.num_atoms for s in structures])
        return np.split(probs, ends[:-1]), table

    def predict_table(self, table: input_pipeline.AtomTable, rows: np.ndarray | None = None,
                      batch_size: int = 4096) -> np.ndarray:
        """(R, C) probabilities of the atoms at `rows` (default: all) of a feature table."""
        rows = np.arange(len(table)) if rows is None else np.asarray(rows)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            size = min(batch_size, 1 << max(0, int(len(chunk) - 1).bit_length()))
            padded = np.pad(chunk, (0, size - len(chunk)), mode="edge")  # few shapes to compile
            inputs = input_pipeline.gather_inputs(table, padded, self.spec)
            out.append(np.asarray(self._probs(self.saved.params, inputs))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.elements)), np.float32)

    def score(self, structures: Sequence[structures_lib.Structure], *,
              per_atom: bool = False, batch_size: int = 4096) -> Scores:
        """Per-site (or per-atom) scores of every structure."""
        structures = list(structures)
        probs, table = self._predict(structures, batch_size)
        starts = np.cumsum([0] + [s.num_atoms for s in structures])
        return Scores(self._score_one(s, p, table.distances[a:a + s.num_atoms, 0], per_atom)
                      for s, p, a in zip(structures, probs, starts))

    def _score_one(self, s: structures_lib.Structure, probs: np.ndarray,
                   first_distance: np.ndarray, per_atom: bool) -> StructureScore:
        class_of = {z: i for i, z in enumerate(self.saved.atomic_numbers)}
        given_class = np.array([class_of.get(int(z), -1) for z in s.numbers])
        modelled = given_class >= 0
        p_given_atoms = probs[np.arange(s.num_atoms), np.maximum(given_class, 0)]
        log_p = np.log(np.maximum(p_given_atoms[modelled], 1e-12))
        plausibility = float(math.exp(log_p.mean())) if modelled.any() else None
        if per_atom:
            groups = [[i] for i in range(s.num_atoms)]
        else:  # the atoms of each site, sites in the order of the CIF's rows
            counts = np.unique(s.site_index, return_counts=True)[1]
            groups = np.split(np.argsort(s.site_index, kind="stable"), np.cumsum(counts)[:-1])
        labels = _site_labels(s)
        sites = []
        for atoms in groups:
            mean = probs[atoms].mean(axis=0)
            best, c = int(np.argmax(mean)), int(given_class[atoms[0]])
            sites.append(SiteScore(
                s.id, labels[atoms[0]], elements_lib.symbol(int(s.numbers[atoms[0]])),
                self.elements[best], float(mean[best]), float(mean[c]) if c >= 0 else None,
                len(atoms), int(s.site_index[atoms[0]]) + 1,
                atoms[0] if per_atom else None))
        return StructureScore(s.id, sites, plausibility, int(modelled.sum()), s.num_atoms,
                              structure_warnings(s, first_distance))


def atom_table(structures: Sequence[structures_lib.Structure],
               k: int) -> input_pipeline.AtomTable:
    """The k-NN features of the structures' atoms, as one table (neighbours in its rows)."""
    good, skips = neighbours.split_featurizable(structures)
    if skips:
        raise errors.FeaturizeError(f"{skips[0].file} [{skips[0].block}]: {skips[0].reason}")
    return table_from(structures, neighbours.featurize(structures, k), k)


def table_from(structures: Sequence[structures_lib.Structure],
               found: Sequence[neighbours.Neighbours], k: int) -> input_pipeline.AtomTable:
    """atom_table from the structures' k-NN already computed."""
    table = input_pipeline.AtomTable.from_structures(
        [s.id for s in structures], [s.numbers for s in structures],
        [s.labels for s in structures], [n.distances for n in found],
        [n.indices for n in found], k)
    # Sites numbered across the table: the symmetry copies of a site are that site.
    offsets = np.cumsum([0] + [int(s.site_index.max()) + 1 for s in structures[:-1]])
    site = np.concatenate([s.site_index.astype(np.int64) + o for s, o in zip(structures, offsets)])
    return dataclasses.replace(table, site=site)


def _site_labels(s: structures_lib.Structure) -> list[str]:
    """Each atom's site label, with '#<row>' (1-based atom-site row) where sites share it."""
    rows_of_label: dict[str, set] = {}
    for label, row in zip(s.labels, s.site_index):
        rows_of_label.setdefault(str(label), set()).add(int(row))
    return [str(label) if len(rows_of_label[str(label)]) == 1 else f"{label}#{int(row) + 1}"
            for label, row in zip(s.labels, s.site_index)]


def structure_warnings(s: structures_lib.Structure, first_distance: np.ndarray) -> list[str]:
    """Why a structure's geometry looks physically absurd, and which atoms the reading
    policies removed (empty when neither)."""
    low, high = SANE_FIRST_NEIGHBOUR
    warnings = []
    close = int(np.sum(first_distance < low))
    if close:
        warnings.append(f"{close} of {s.num_atoms} atoms have a neighbour closer than {low} A")
    far = int(np.sum(first_distance > high))
    if far:
        warnings.append(f"{far} of {s.num_atoms} atoms have no neighbour within {high} A")
    over = int(np.sum(s.occupancies > 1.0 + 1e-3))
    if over:
        warnings.append(f"{over} atoms have an occupancy above 1")
    for policy, n in s.removed.items():
        what = structures_lib.POLICY_REMOVALS.get(policy, policy)
        warnings.append(f"reading removed {n} atoms: {what}")
    return warnings


# ----------------------------------------------------------------------------
# Reading files and writing reports.


def read_files(paths: Sequence[str], options: structures_lib.ReadOptions | None = None):
    """(structures, messages, all_read): every structure the reader accepts from the CIF
    files and folders (recursive) in `paths`, one message line per unreadable file or
    skipped block, and whether every file gave a structure."""
    options = options or structures_lib.ReadOptions()
    structures, messages, all_read = [], [], True
    for path in structures_lib.iter_cif_paths(paths):
        found, skips = structures_lib.read_cif(path, options)
        good, unusable = neighbours.split_featurizable(found)
        skips.extend(unusable)
        if not good:
            all_read = False
            reason = "; ".join(sk.reason for sk in skips[:3]) or "no structures in file"
            messages.append(f"{path}: not read: {util.one_line(reason)}")
        else:
            messages.extend(f"{path}: block {sk.block or '?'} skipped: "
                            f"{util.one_line(sk.reason)}" for sk in skips)
        structures.extend(good)
    return structures, messages, all_read


# Floats of model inputs per forward pass at most (~256 MB): a model with a wide
# neighbourhood (large k, many hops) scores fewer atoms per pass.
MAX_BATCH_INPUT_FLOATS = 2**26


def score_isolated(model: Model, structures: Sequence[structures_lib.Structure], *,
                   per_atom: bool = False, batch_size: int = 4096, chunk: int = 256
                   ) -> tuple[Scores, list[structures_lib.Skip]]:
    """Model.score, `chunk` structures at a time, skipping (with the reason) each one
    that cannot be featurised instead of failing them all. Returns (scores, skips)."""
    batch_size = max(1, min(batch_size, MAX_BATCH_INPUT_FLOATS
                            // saved_model.input_floats(model.saved.config)))
    scores, skips = Scores(), []
    for part in util.chunked(structures, chunk):
        kept, found, bad = neighbours.featurize_isolated(part, model.k)
        skips.extend(bad)
        if not kept:
            continue
        table = table_from(kept, found, model.k)
        probs = model.predict_table(table, batch_size=batch_size)
        if not np.all(np.isfinite(probs)):  # the inputs are finite: the model is at fault
            raise errors.ModelError(f"the {model.source} gives non-finite outputs: it is "
                                    f"damaged or diverged in training; retrain it")
        starts = np.cumsum([0] + [s.num_atoms for s in kept])
        scores.extend(model._score_one(s, probs[a:a + s.num_atoms],
                                       table.distances[a:a + s.num_atoms, 0], per_atom)
                      for s, a in zip(kept, starts))
    return scores, skips


def format_structure(score: StructureScore, threshold: float,
                     implausible_only: bool = False) -> str:
    """Text block of one structure: a header line, warnings, one line per site."""
    flagged = score.implausible(threshold)
    plaus = "-" if score.plausibility is None else f"{score.plausibility:.3f}"
    lines = [f"{score.structure_id}: plausibility {plaus} (geometric mean p(given) over "
             f"{score.modelled_atoms} of {score.num_atoms} atoms); {len(flagged)} implausible "
             f"site{'s' if len(flagged) != 1 else ''}"]
    lines += [f"  {score.structure_id}  WARNING: {w}" for w in score.warnings]
    width = max([len(t.site_label) for t in score.sites] + [4])
    if flagged or not implausible_only:
        lines.append(f"  {score.structure_id}  {'site':<{width}}  given  predicted      "
                     f"p(given)  atoms")
    for t in (flagged if implausible_only else score.sites):
        if t.p_given is None:
            given, mark = "     -", "  (element not modelled)"
        else:
            given = f"{t.p_given:6.3f}"
            mark = "  IMPLAUSIBLE" if t.p_given < threshold else ""
        lines.append(f"  {score.structure_id}  {t.site_label:<{width}}  {t.given:<5}  "
                     f"{t.predicted:<3} {t.p_predicted:5.3f}      {given}  {t.multiplicity:5d}"
                     f"{mark}")
    return "\n".join(lines)


def _csv_row(score: StructureScore, t: SiteScore) -> list:
    return [t.structure_id, t.site_label, t.given, t.predicted, f"{t.p_predicted:.4f}",
            "" if t.p_given is None else f"{t.p_given:.4f}", t.multiplicity, t.site_row,
            "" if t.atom_index is None else t.atom_index, "; ".join(score.warnings)]


def write_csv(path: str, scores: Sequence[StructureScore]) -> None:
    import csv

    with util.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for score in scores:
            for t in score.sites:
                w.writerow(_csv_row(score, t))
