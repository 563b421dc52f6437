"""Scoring structures with a trained model: how plausible is each site's element?

  model = load_model()                     # the shipped model (or load_model(workdir))
  model.predict_proba(structures)          # (num_atoms, num_classes) per structure
  model.check(structures)                  # per-site scores, as `cryknn predict` prints them
                                           # (`score` is the same method)

Every method takes one structure or a list: cryknn Structures, ase.Atoms or pymatgen
Structures.

A site is one row of the CIF's atom-site loop; its symmetry copies are its atoms (a
structure that did not come from a CIF has one site per atom). For every site: the
element the model predicts, and p(given), the model's probability of the element the file
states, both averaged over the site's atoms. Per structure, the plausibility is the
geometric mean of p(given) over the atoms whose element the model knows (1 = the model
agrees everywhere). Probabilities are calibrated where the model was (temperature
scaling fitted on validation, `cryknn.calibration`). Every site gets a flag: `implausible`
(p(given) below the threshold, the model's checking threshold by default), or
`outside_domain` (the model does not model its element, or, for a calibrated model, its
environment is unlike any in training: its p(given) says little, so it is never called
implausible), or none. Physically absurd input (atoms on top of each other, atoms with no
neighbour in reach, occupancies above 1) is scored but flagged with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import numpy as np

from cryknn import calibration
from cryknn import config as config_lib
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import extras
from cryknn import input_pipeline
from cryknn import neighbours
from cryknn import saved_model
from cryknn import cif as structures_lib
from cryknn import util

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
DEFAULT_MODEL = "default"
CSV_COLUMNS = ("structure_id", "site_label", "given_element", "predicted_element",
               "p_predicted", "p_given", "multiplicity", "site_row", "atom_index",
               "structure_warnings", "structure_plausibility", "top3", "flag")
FLAGS = ("implausible", "outside_domain", "")
# Without a checking threshold in model.json: flag p(given) below this.
DEFAULT_THRESHOLD = 0.05
# A structure is mostly outside the domain when more than this share of its atoms is.
MOSTLY_OUTSIDE = 0.5
# First-neighbour distances outside this range (angstrom) are flagged: no bond is shorter
# than 0.5 A (X-ray C-H is 0.93 A), and in no solid is the nearest atom 4 A away.
SANE_FIRST_NEIGHBOUR = (0.5, 4.0)


def pretrained_names() -> list[str]:
    if not os.path.isdir(PRETRAINED):
        return []
    return sorted(n for n in os.listdir(PRETRAINED)
                  if saved_model.exists(os.path.join(PRETRAINED, n)))


def checking_default() -> str:
    """The shipped model that checks best: the most single Z+-1 swaps caught on validation
    at its checking threshold (then the fewest real structures flagged); `default` when no
    shipped model was calibrated."""
    import json

    best = (None, DEFAULT_MODEL)
    for name in pretrained_names():
        try:
            with open(os.path.join(PRETRAINED, name, saved_model.MODEL_JSON)) as f:
                found = json.load(f).get("checking") or {}
        except (OSError, ValueError):
            continue
        if found.get("swap_detection") is not None:
            key = (found["swap_detection"], -found.get("real_structures_flagged", 1.0))
            if best[0] is None or key > best[0]:
                best = (key, name)
    return best[1]


def load_model(workdir: str | None = None, name: str = DEFAULT_MODEL) -> "Model":
    """The model trained in `workdir`, or else the shipped pretrained model `name`."""
    if workdir is not None:
        if not extras.installed("orbax.checkpoint"):  # the core install: exports only
            return Model(_load_export(workdir), f"workdir {workdir}")
        from cryknn import checkpoints  # orbax: only for a workdir without an export

        return Model(checkpoints.load_trained(workdir), f"workdir {workdir}")
    folder = os.path.join(PRETRAINED, name)
    if not saved_model.exists(folder):
        raise errors.ModelError(f"no shipped model named {name!r}; shipped: "
                                f"{', '.join(pretrained_names()) or 'none'}")
    return Model(saved_model.load(folder), f"shipped model {name!r}")


def _load_export(workdir: str) -> saved_model.SavedModel:
    """The params-only export of a finished run (`<workdir>/model`), without orbax."""
    export = os.path.join(workdir, "model")
    if not saved_model.exists(export):
        raise errors.MissingExtraError(
            f"{workdir} has no exported model (no training run there, or it is unfinished); "
            f"reading its checkpoints needs the 'train' extra: pip install 'cryknn[train]'")
    return saved_model.load(export)


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
    top: list = dataclasses.field(default_factory=list)  # [(element, p)], 3 most probable
    flag: str = ""  # 'implausible', 'outside_domain' or '' (FLAGS)


@dataclasses.dataclass
class StructureScore:
    structure_id: str
    sites: list[SiteScore]
    plausibility: float | None  # geometric mean of p(given) over modelled atoms
    modelled_atoms: int
    num_atoms: int
    warnings: list[str]

    def implausible(self, threshold: float | None = None) -> list[SiteScore]:
        """The sites flagged implausible (or, given a threshold, the sites in the domain
        with p(given) below it)."""
        if threshold is None:
            return [s for s in self.sites if s.flag == "implausible"]
        return [s for s in self.sites if s.flag != "outside_domain" and s.p_given is not None
                and s.p_given < threshold]

    def outside_domain(self) -> list[SiteScore]:
        return [s for s in self.sites if s.flag == "outside_domain"]

    @property
    def outside_atoms(self) -> int:
        """Unit-cell atoms of the sites outside the model's domain."""
        return sum(s.multiplicity for s in self.outside_domain())

    @property
    def mostly_outside_domain(self) -> bool:
        return self.outside_atoms > MOSTLY_OUTSIDE * max(self.num_atoms, 1)


class Scores(list):
    """StructureScores, one per structure; `to_pandas()` gives one row per site."""

    def rows(self) -> list[dict]:
        """The CSV's rows (formatted text), one per site."""
        return [dict(zip(CSV_COLUMNS, _csv_row(score, site))) for score in self
                for site in score.sites]

    def to_pandas(self, per: str = "site"):
        """A typed DataFrame (needs the pandas extra: pip install 'cryknn[pandas]').

        per='site': the CSV's columns, one row per site (or atom); probabilities are floats,
        NaN where the given element is not modelled. per='structure': one row per structure
        (structure_id, plausibility, modelled_atoms, num_atoms, num_sites, warnings)."""
        from cryknn import extras

        extras.require("pandas", "Scores.to_pandas")
        import pandas as pd

        if per == "structure":
            return pd.DataFrame(_structure_record(s) for s in self).astype(
                {"plausibility": float})
        if per != "site":
            raise errors.ConfigError(f"per must be 'site' or 'structure', got {per!r}")
        frame = pd.DataFrame([_site_record(score, t) for score in self for t in score.sites],
                             columns=list(CSV_COLUMNS))
        return frame.astype({"p_predicted": float, "p_given": float, "multiplicity": int,
                             "site_row": int, "atom_index": "Int64",
                             "structure_plausibility": float})

    def to_html(self, path: str, structures, threshold: float = 0.05, **kwargs) -> int:
        """Writes the HTML report of these scores and the `structures` scored (see
        cryknn.report.write_html); returns the structures in it."""
        from cryknn import report

        return report.write_html(path, structures, self, threshold=threshold, **kwargs)


def _site_record(score: StructureScore, t: SiteScore) -> list:
    nan = float("nan")
    return [t.structure_id, t.site_label, t.given, t.predicted, t.p_predicted,
            nan if t.p_given is None else t.p_given, t.multiplicity, t.site_row,
            t.atom_index, "; ".join(score.warnings),
            nan if score.plausibility is None else score.plausibility, _top3_text(t), t.flag]


def _structure_record(score: StructureScore) -> dict:
    return {"structure_id": score.structure_id,
            "plausibility": float("nan") if score.plausibility is None else score.plausibility,
            "modelled_atoms": score.modelled_atoms, "num_atoms": score.num_atoms,
            "num_sites": len(score.sites), "warnings": "; ".join(score.warnings),
            "implausible_sites": len(score.implausible()),
            "outside_domain_sites": len(score.outside_domain()),
            "mostly_outside_domain": score.mostly_outside_domain}


def _top3_text(t: SiteScore) -> str:
    return " ".join(f"{element}:{p:.3f}" for element, p in t.top)


class Model:
    """A trained element predictor (geometry only, or masked-atom mode)."""

    def __init__(self, saved: saved_model.SavedModel, source: str):
        import jax

        self.saved = saved
        self.source = source
        self.spec = config_lib.input_spec(saved.config)
        self.temperature = calibration.temperature_of(saved.info)  # 1: not calibrated
        self.domain = calibration.domain_of(saved.info, saved.folder)  # None: not fitted
        apply = saved.model.apply
        self._probs = jax.jit(lambda params, inputs, t: jax.nn.softmax(
            apply({"params": params}, inputs, train=False)["logits"] / t, -1))

    @property
    def threshold(self) -> float:
        """The checking threshold on p(given) chosen on validation (`cryknn.checking`),
        or DEFAULT_THRESHOLD for a model without one."""
        return float((self.saved.info.get("checking") or {}).get("threshold",
                                                                 DEFAULT_THRESHOLD))

    def checking_note(self, threshold: float) -> str:
        """One line: the threshold in use and, when it is the model's own, what it caught
        on validation."""
        found = self.saved.info.get("checking") or {}
        if ("threshold" not in found or found.get("swap_detection") is None
                or abs(found["threshold"] - threshold) > 1e-12):
            return f"checking at p(given) < {threshold:.3g}"
        return (f"checking at p(given) < {threshold:.3g}, chosen on validation: it catches "
                f"{found['swap_detection']:.0%} of single Z+-1 swaps and flags "
                f"{found['real_structures_flagged']:.1%} of real structures")

    def in_domain(self, table: input_pipeline.AtomTable) -> np.ndarray:
        """(A,) bool: the atom's element is modelled and, for a model with a fitted
        domain, its environment scores within the domain's cutoff."""
        known = np.isin(table.atomic_number, self.saved.atomic_numbers)
        if self.domain is None or len(table) == 0:
            return known
        found = calibration.features(table.distances, table.neighbour_index,
                                     table.atomic_number, self.k)
        return known & (self.domain.score(found) <= self.domain.cutoff)

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

    def _top(self, probs: np.ndarray, n: int = 3) -> list[tuple[str, float]]:
        """The n most probable elements of a (C,) probability vector, best first."""
        return [(self.elements[int(i)], float(probs[i])) for i in np.argsort(-probs)[:n]]

    def describe(self) -> str:
        s = self.saved
        unfinished = ("" if s.total_steps is None or s.step is None or s.step >= s.total_steps
                      else f", training unfinished: step {s.step} of {s.total_steps}")
        notes = "".join(f"\n{note}" for note in s.info.get("notes", []))
        calibrated = (f"; calibrated on validation, T={self.temperature:.2f}"
                      if calibration.KEY in s.info else "")
        return (f"model {s.config.model} ({self.mode}; k={self.k}; elements "
                f"{','.join(self.elements)}{calibrated}) from {self.source}{unfinished}{notes}")

    def predict_proba(self, structures, batch_size: int = 4096):
        """(num_atoms, num_classes) probabilities per structure, atoms in structure order:
        one array for one structure, a list of arrays for a list. structures: cryknn
        Structures, ase.Atoms or pymatgen Structures. Raises FeaturizeError for a structure
        whose cell cannot be featurised."""
        found = structures_lib.as_structures(structures)
        probs = self._predict(found, batch_size)[0]
        return probs[0] if structures_lib.is_single(structures) else probs

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
        if self.spec.reads == "graph":
            return self._predict_graph(table, rows, batch_size)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            size = min(batch_size, 1 << max(0, int(len(chunk) - 1).bit_length()))
            padded = np.pad(chunk, (0, size - len(chunk)), mode="edge")  # few shapes to compile
            inputs = input_pipeline.gather_inputs(table, padded, self.spec)
            out.append(np.asarray(self._probs(self.saved.params, inputs,
                                              np.float32(self.temperature)))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.elements)), np.float32)

    def _predict_graph(self, table: input_pipeline.AtomTable, rows: np.ndarray,
                       batch_size: int) -> np.ndarray:
        """Whole structures (crops of big ones) in packs of at most `batch_size` slots: one
        forward pass per pack, every atom's state computed once per hop."""
        from cryknn import graph_batch

        probs = np.zeros((len(rows), len(self.elements)), np.float32)
        for pack in graph_batch.inference_packs(
                table, rows, self.spec.receptive_hops, batch_size,
                with_elements=self.spec.neighbour_elements):
            inputs = graph_batch.stack([pack])[0]
            out = np.asarray(self._probs(self.saved.params, inputs,
                                         np.float32(self.temperature)))[0]
            keep = pack.loss_position >= 0
            probs[pack.loss_position[keep]] = out[keep]
        return probs

    def check(self, structures, *, per_atom: bool = False, batch_size: int = 4096,
              threshold: float | None = None) -> Scores:
        """Per-site (or per-atom) scores of every structure (one, or a list; cryknn
        Structures, ase.Atoms or pymatgen Structures): what `cryknn check` prints."""
        return self.score(structures, per_atom=per_atom, batch_size=batch_size,
                          threshold=threshold)

    def score(self, structures, *, per_atom: bool = False, batch_size: int = 4096,
              progress=None, chunk: int = 64, threshold: float | None = None) -> Scores:
        """Per-site (or per-atom) scores of every structure; the same as `check` (scores,
        not a metric as in scikit-learn). Sites are flagged at p(given) < threshold
        (default: the model's checking threshold). progress(done, total): called after
        every `chunk` structures, which are then scored a chunk at a time."""
        structures = structures_lib.as_structures(structures)
        if progress is not None:
            scores = Scores()
            for part in util.chunked(structures, chunk):
                scores.extend(self.score(part, per_atom=per_atom, batch_size=batch_size,
                                         threshold=threshold))
                progress(len(part), len(structures))
            return scores
        probs, table = self._predict(structures, batch_size)
        return self._scores(structures, table, np.concatenate(probs) if probs else None,
                            per_atom, threshold)

    def _scores(self, structures: Sequence[structures_lib.Structure],
                table: input_pipeline.AtomTable | None, probs: np.ndarray | None,
                per_atom: bool, threshold: float | None) -> Scores:
        """Scores of structures from their table's (A, C) probabilities."""
        if table is None:
            return Scores()
        threshold = self.threshold if threshold is None else threshold
        in_domain = self.in_domain(table)
        starts = np.cumsum([0] + [s.num_atoms for s in structures])
        return Scores(self._score_one(s, probs[a:a + s.num_atoms],
                                      table.distances[a:a + s.num_atoms, 0], per_atom,
                                      in_domain[a:a + s.num_atoms], threshold)
                      for s, a in zip(structures, starts))

    def _score_one(self, s: structures_lib.Structure, probs: np.ndarray,
                   first_distance: np.ndarray, per_atom: bool, in_domain: np.ndarray,
                   threshold: float) -> StructureScore:
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
            p_given = float(mean[c]) if c >= 0 else None
            flag = ("outside_domain" if p_given is None or not in_domain[atoms].all() else
                    "implausible" if p_given < threshold else "")
            sites.append(SiteScore(
                s.id, labels[atoms[0]], elements_lib.symbol(int(s.numbers[atoms[0]])),
                self.elements[best], float(mean[best]), p_given,
                len(atoms), int(s.site_index[atoms[0]]) + 1,
                atoms[0] if per_atom else None, top=self._top(mean), flag=flag))
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
    """atom_table from the structures' k-NN already computed. Sites as in training:
    symmetry copies of a CIF row, and coincident same-element atoms."""
    return input_pipeline.AtomTable.from_structures(
        [s.id for s in structures], [s.numbers for s in structures],
        [s.labels for s in structures], [n.distances for n in found],
        [n.indices for n in found], k, [s.site_index for s in structures],
        [n.vectors for n in found])


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
    return warnings + list(getattr(s, "notes", ()))


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
                   per_atom: bool = False, batch_size: int = 4096, chunk: int = 256,
                   progress=None, threshold: float | None = None
                   ) -> tuple[Scores, list[structures_lib.Skip]]:
    """Model.score, `chunk` structures at a time, skipping (with the reason) each one
    that cannot be featurised instead of failing them all. Returns (scores, skips).
    progress(done, total): called after every chunk with the structures it held.
    threshold: as in Model.score."""
    batch_size = max(1, min(batch_size, MAX_BATCH_INPUT_FLOATS
                            // saved_model.input_floats(model.saved.config)))
    scores, skips = Scores(), []
    for part in util.chunked(structures, chunk):
        kept, found, bad = neighbours.featurize_isolated(part, model.k)
        skips.extend(bad)
        if progress is not None:
            progress(len(part), len(structures))
        if not kept:
            continue
        table = table_from(kept, found, model.k)
        probs = model.predict_table(table, batch_size=batch_size)
        if not np.all(np.isfinite(probs)):  # the inputs are finite: the model is at fault
            raise errors.ModelError(f"the {model.source} gives non-finite outputs: it is "
                                    f"damaged or diverged in training; retrain it")
        scores.extend(model._scores(kept, table, probs, per_atom, threshold))
    return scores, skips


def format_structure(score: StructureScore, threshold: float,
                     implausible_only: bool = False) -> str:
    """Text block of one structure within WIDTH columns: a header line naming it (the only
    line that does), warnings, one line per site (per atom: the label with [atom index])."""
    import textwrap

    flagged = score.implausible(threshold)
    plaus = "-" if score.plausibility is None else f"{score.plausibility:.3f}"
    outside = len(score.outside_domain())
    tail = (f"  plausibility {plaus} ({score.modelled_atoms}/{score.num_atoms} atoms "
            f"modelled), {len(flagged)} implausible" + (f", {outside} outside domain"
                                                        if outside else ""))
    lines = [_fit(score.structure_id, WIDTH - len(tail)) + tail]
    if score.mostly_outside_domain:
        lines.append(_fit(f"  OUTSIDE DOMAIN: {score.outside_atoms} of {score.num_atoms} atoms "
                          f"have elements or environments unlike the training data", WIDTH))
    for w in score.warnings:
        lines += textwrap.wrap(w, WIDTH, initial_indent="  WARNING: ",
                               subsequent_indent=" " * 11)
    shown = flagged if implausible_only else score.sites
    labels = [_fit(t.site_label + ("" if t.atom_index is None else f"[{t.atom_index}]"),
                   MAX_LABEL) for t in shown]
    width = max([len(label) for label in labels] + [4])
    if shown:
        lines.append(f"  {'site':<{width}}  given  predicted   p(given)  atoms  top 3")
    for t, label in zip(shown, labels):
        given = "     -" if t.p_given is None else f"{t.p_given:6.3f}"
        mark = ("  not modelled" if t.p_given is None else  # outside the domain too
                "  outside domain" if t.flag == "outside_domain" else
                "  IMPLAUSIBLE" if t.p_given < threshold else "")
        top = " ".join(f"{e}:{p:.2f}" for e, p in t.top)
        lines.append(f"  {label:<{width}}  {t.given:<5}  {t.predicted:<3} {t.p_predicted:5.3f}"
                     f"     {given}  {t.multiplicity:5d}  {top}{mark}")
    return "\n".join(lines)


WIDTH = 100  # terminal output fits this many columns
MAX_LABEL = 16


def _fit(text: str, width: int) -> str:
    """text, shortened in the middle to at most width characters."""
    if len(text) <= width:
        return text
    half = (width - 3) // 2
    return text[:half] + "..." + text[len(text) - (width - 3 - half):]


def format_summary(scores: Sequence[StructureScore], threshold: float, files: int,
                   not_read: int, worst: int = 5) -> str:
    """The closing summary of a run: files read and not, structures scored and flagged,
    the `worst` least plausible structures."""
    flagged = sum(1 for score in scores if score.implausible(threshold))
    outside = sum(1 for score in scores if score.mostly_outside_domain)
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    lines = [f"summary: {plural(files, 'file')}, {plural(not_read, 'file')} not read; "
             f"{plural(len(scores), 'structure')} scored",
             f"flagged: {plural(flagged, 'structure')} with a site of p(given) < {threshold:.3g}"
             f"; {outside} mostly outside the model's domain"]
    ranked = sorted((score for score in scores if score.plausibility is not None),
                    key=lambda score: score.plausibility)[:worst]
    if ranked:
        lines.append(f"least plausible {len(ranked)}:")
        lines += [f"  {score.plausibility:.3f}  {_fit(score.structure_id, WIDTH - 9)}"
                  for score in ranked]
    return "\n".join(lines)


def _csv_row(score: StructureScore, t: SiteScore) -> list:
    return [t.structure_id, t.site_label, t.given, t.predicted, f"{t.p_predicted:.4f}",
            "" if t.p_given is None else f"{t.p_given:.4f}", t.multiplicity, t.site_row,
            "" if t.atom_index is None else t.atom_index, "; ".join(score.warnings),
            "" if score.plausibility is None else f"{score.plausibility:.4f}", _top3_text(t),
            t.flag]


def write_csv(path: str, scores: Sequence[StructureScore]) -> None:
    import csv

    with util.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for score in scores:
            for t in score.sites:
                w.writerow(_csv_row(score, t))


FLAGGED_FORMATS = (".cif", ".xyz", ".extxyz")


def write_flagged(path: str, structures: Sequence[structures_lib.Structure],
                  scores: Sequence[StructureScore], threshold: float) -> int:
    """Writes the structures with an implausible site, with the flags per atom: a CIF
    (`write_flagged_cif`) or, for .xyz / .extxyz, extended XYZ through ase with the
    per-atom arrays cryknn_p_given, cryknn_predicted and cryknn_flag. Returns how many."""
    if path.lower().endswith(".cif"):
        return write_flagged_cif(path, structures, scores, threshold)
    from cryknn import extras

    extras.require("ase", "writing extended XYZ")
    import ase.io

    images = []
    for s, score in _paired(structures, scores):
        if score.implausible(threshold):
            atoms = s.to_ase()
            p_given, predicted, flag = _atom_flags(s, score, threshold)
            atoms.arrays["cryknn_p_given"] = np.array([np.nan if p is None else p
                                                       for p in p_given])
            atoms.arrays["cryknn_predicted"] = np.array(predicted)
            atoms.arrays["cryknn_flag"] = np.array(flag)
            atoms.info["structure_id"] = score.structure_id
            atoms.info["plausibility"] = score.plausibility
            images.append(atoms)
    with util.atomic_path(path, suffix=".xyz") as tmp:
        ase.io.write(tmp, images, format="extxyz")
    return len(images)


def _paired(structures: Sequence[structures_lib.Structure],
            scores: Sequence[StructureScore]):
    """(structure, its score) in order; structures without a score (skipped while scoring)
    are passed over."""
    it = iter(scores)
    score = next(it, None)
    for s in structures:
        if score is not None and score.structure_id == s.id:
            yield s, score
            score = next(it, None)


def _atom_flags(s: structures_lib.Structure, score: StructureScore, threshold: float):
    """Per unit-cell atom: p(given) (None: not modelled), predicted element, flag
    ('implausible', 'outside_domain', 'not_modelled' (outside the domain: an element the
    model does not model) or '.')."""
    per_atom = any(t.atom_index is not None for t in score.sites)
    site_of = {(t.atom_index if per_atom else t.site_row - 1): t for t in score.sites}
    sites = [site_of[i if per_atom else int(s.site_index[i])] for i in range(s.num_atoms)]
    flags = ["not_modelled" if t.p_given is None else
             "outside_domain" if t.flag == "outside_domain" else
             "implausible" if t.p_given < threshold else "." for t in sites]
    return [t.p_given for t in sites], [t.predicted for t in sites], flags


def write_flagged_cif(path: str, structures: Sequence[structures_lib.Structure],
                      scores: Sequence[StructureScore], threshold: float) -> int:
    """Writes every structure with an implausible site as a P1 CIF block of its unit-cell
    atoms, with the columns _atom_site_cryknn_p_given, _atom_site_cryknn_predicted and
    _atom_site_cryknn_flag ('implausible', 'outside_domain', 'not_modelled' or '.'), which
    VESTA, Mercury, ase and gemmi read (unknown tags are kept or ignored). Returns the
    blocks written."""
    blocks = [_flagged_block(s, score, threshold) for s, score in _paired(structures, scores)
              if score.implausible(threshold)]
    with util.atomic_open(path, "w") as f:
        f.write("# cryknn: structures with implausible sites\n" + "".join(blocks))
    return len(blocks)


def _flagged_block(s: structures_lib.Structure, score: StructureScore, threshold: float) -> str:
    from gemmi import cif

    p_given, predicted, flags = _atom_flags(s, score, threshold)
    a, b, c = np.linalg.norm(s.lattice, axis=1)
    cosines = [s.lattice[i] @ s.lattice[j] / (n_i * n_j) for i, j, n_i, n_j in
               ((1, 2, b, c), (0, 2, a, c), (0, 1, a, b))]
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", score.structure_id)
    lines = [f"data_{name}", f"_cell_length_a {a:.6f}", f"_cell_length_b {b:.6f}",
             f"_cell_length_c {c:.6f}", f"_cell_angle_alpha {angles[0]:.6f}",
             f"_cell_angle_beta {angles[1]:.6f}", f"_cell_angle_gamma {angles[2]:.6f}",
             "_symmetry_space_group_name_H-M 'P 1'", "loop_"]
    lines += [f"_atom_site_{tag}" for tag in (
        "label", "type_symbol", "fract_x", "fract_y", "fract_z", "occupancy",
        "cryknn_p_given", "cryknn_predicted", "cryknn_flag")]
    for i in range(s.num_atoms):
        p = "?" if p_given[i] is None else f"{p_given[i]:.4f}"
        x, y, z = s.frac[i]
        lines.append(f"{cif.quote(str(s.labels[i]))} {elements_lib.symbol(int(s.numbers[i]))} "
                     f"{x:.6f} {y:.6f} {z:.6f} {float(s.occupancies[i]):.4f} {p} "
                     f"{predicted[i]} {flags[i]}")
    return "\n".join(lines) + "\n\n"
