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
(by the model's `CheckRule`: p(given) below the threshold or, for a model with an adjacent
threshold, p(given) far below that of the element next to it in Z), or
`outside_domain` (the model does not model its element, or, for a calibrated model, its
environment is unlike any in training: its p(given) says little, so it is never called
implausible), or none. Physically absurd input (atoms on top of each other, atoms with no
neighbour in reach, occupancies above 1) is scored but flagged with a warning.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from cryknn import calibration
from cryknn import cif
from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import extras
from cryknn import features
from cryknn import member_forward
from cryknn import neighbours
from cryknn import saved_model
from cryknn.site_scores import Scores, SiteScore, StructureScore  # what Model returns
from cryknn import util

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
DEFAULT_MODEL = "default"
# Without a checking threshold in model.json: flag p(given) below this.
DEFAULT_THRESHOLD = 0.05
# First-neighbour distances outside this range (angstrom) are flagged: no bond is shorter
# than 0.5 A (X-ray C-H is 0.93 A), and in no solid is the nearest atom 4 A away.
SANE_FIRST_NEIGHBOUR = (0.5, 4.0)


@dataclasses.dataclass(frozen=True)
class CheckRule:
    """When a site in the model's domain is implausible: p(given) < threshold, or (with an
    adjacent_threshold) p_vs_adjacent = p(given) / (p(given) + p(the likeliest modelled
    element next to it in Z, `elements.ADJACENT_Z_PAIRS`)) < adjacent_threshold: the
    given element is far less likely than its neighbour in Z, the mis-assignment X-ray
    diffraction makes. The first catches any unlikely element, the second the likely
    mistake at a lower false-alarm cost (`cryknn.checking` fits both on validation)."""

    threshold: float
    adjacent_threshold: float | None = None

    def score(self, p_given, p_vs_adjacent) -> np.ndarray:
        """(N,) below 1 exactly where flagged: min(p_given / threshold, p_vs_adjacent /
        adjacent_threshold); a NaN p_vs_adjacent (no modelled neighbour in Z) never
        flags."""
        score = np.asarray(p_given, float) / self.threshold
        if self.adjacent_threshold is not None:
            ratio = np.nan_to_num(np.asarray(p_vs_adjacent, float), nan=np.inf)
            with np.errstate(divide="ignore"):
                score = np.minimum(score, ratio / self.adjacent_threshold)
        return score

    def describe(self) -> str:
        text = f"p(given) < {self.threshold:.3g}"
        if self.adjacent_threshold is None:
            return text
        return (f"{text} or p(given) / (p(given) + p(Z+-1 neighbour)) < "
                f"{self.adjacent_threshold:.3g}")


def adjacent_classes(atomic_numbers: Sequence[int]) -> np.ndarray:
    """(119, C) bool: [z, c] where class c's element is next to element z in Z as
    `elements.ADJACENT_Z_PAIRS` lists (both modelled)."""
    class_of = {int(z): c for c, z in enumerate(atomic_numbers)}
    out = np.zeros((119, len(atomic_numbers)), bool)
    for a, b in elements_lib.ADJACENT_Z_PAIRS:
        za, zb = elements_lib.atomic_number(a), elements_lib.atomic_number(b)
        if za in class_of and zb in class_of:
            out[za, class_of[zb]] = out[zb, class_of[za]] = True
    return out


def p_vs_adjacent(probs: np.ndarray, numbers: np.ndarray,
                  atomic_numbers: Sequence[int]) -> np.ndarray:
    """(N,) p(given) / (p(given) + the largest p of a modelled element next to it in Z),
    from probs (N, C) over the classes `atomic_numbers` and the given elements numbers
    (N,); NaN where the given element is not modelled or has no such neighbour."""
    numbers = np.asarray(numbers)
    class_of = np.full(119, -1)
    class_of[np.asarray(atomic_numbers)] = np.arange(len(atomic_numbers))
    c = class_of[numbers]
    adjacent = adjacent_classes(atomic_numbers)[numbers]
    given = probs[np.arange(len(numbers)), np.maximum(c, 0)]
    rival = np.where(adjacent, probs, 0).max(axis=1) if len(numbers) else given
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = given / (given + rival)
    return np.where((c >= 0) & adjacent.any(axis=1), np.nan_to_num(ratio, nan=0.5), np.nan)


def pretrained_names() -> list[str]:
    if not os.path.isdir(PRETRAINED):
        return []
    return sorted(n for n in os.listdir(PRETRAINED)
                  if saved_model.exists(os.path.join(PRETRAINED, n)))


def checking_default() -> str:
    """The shipped model that checks best: the most single Z+-1 swaps caught on validation
    by its checking rule (then the fewest real structures flagged); `default` when no
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
        try:  # a finished run's export needs no orbax (whose import costs 0.1 s)
            return Model(_load_export(workdir), f"workdir {workdir}")
        except (errors.MissingExtraError, errors.ModelError):
            if not extras.installed("orbax.checkpoint"):  # the core install: exports only
                raise
        # Unfinished, or a damaged export: the checkpoints say which.
        from cryknn import checkpoints  # orbax: only for a workdir without a usable export

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


class Model:
    """A trained element predictor (geometry only, or masked-atom mode), or an ensemble of
    such models (the same elements, k and mode; architectures may differ), whose
    probabilities are averaged before the ensemble's own temperature scaling."""

    def __init__(self, saved: saved_model.SavedModel, source: str):
        self.saved = saved
        self.source = source
        self.temperature = calibration.temperature_of(saved.info)  # 1: not calibrated
        self.domain = calibration.domain_of(saved.info, saved.folder)  # None: not fitted
        # A single model is its only member.
        self._forward = member_forward.forwards(saved.members or [saved])
        self.spec = member_forward.widest_spec([member.spec for member in self._forward])

    @property
    def rule(self) -> CheckRule:
        """The checking rule chosen on validation (`cryknn.checking`); p(given) <
        DEFAULT_THRESHOLD for a model without one."""
        found = self.saved.info.get("checking") or {}
        return CheckRule(float(found.get("threshold", DEFAULT_THRESHOLD)),
                         found.get("adjacent_threshold"))

    @property
    def threshold(self) -> float:
        """The checking rule's threshold on p(given)."""
        return self.rule.threshold

    def rule_with(self, threshold: float | None = None,
                  adjacent_threshold: float | None = None) -> CheckRule:
        """The model's rule with the thresholds given (not None) in place of its own; an
        adjacent_threshold of 0 turns that test off."""
        rule = self.rule
        if threshold is not None:
            rule = dataclasses.replace(rule, threshold=float(threshold))
        if adjacent_threshold is not None:
            rule = dataclasses.replace(rule, adjacent_threshold=float(adjacent_threshold)
                                       or None)
        return rule

    def checking_note(self, rule: CheckRule | float) -> str:
        """One line: the rule in use (or p(given) < a threshold) and, when it is the
        model's own, what it caught on validation."""
        rule = rule if isinstance(rule, CheckRule) else CheckRule(float(rule))
        found = self.saved.info.get("checking") or {}
        if found.get("swap_detection") is None or rule != self.rule:
            return f"checking at {rule.describe()}"
        return (f"checking at {rule.describe()}, chosen on validation: it catches "
                f"{found['swap_detection']:.0%} of single Z+-1 swaps and flags "
                f"{found['real_structures_flagged']:.1%} of real structures")

    def in_domain(self, table: features.AtomTable) -> np.ndarray:
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
        kind = f"model {s.config.model}"
        if self.num_members > 1:
            counts = collections.Counter(m.config.model for m in s.members)
            kind = "ensemble of " + " and ".join(f"{n} {name}" for name, n in counts.items())
            kind += " models"
        return (f"{kind} ({self.mode}; k={self.k}; elements "
                f"{','.join(self.elements)}{calibrated}) from {self.source}{unfinished}{notes}")

    def predict_proba(self, structures, batch_size: int = 4096):
        """(num_atoms, num_classes) probabilities per structure, atoms in structure order:
        one array for one structure, a list of arrays for a list. structures: cryknn
        Structures, ase.Atoms or pymatgen Structures. Raises FeaturizeError for a structure
        whose cell cannot be featurised."""
        found = cif.as_structures(structures)
        probs = self._predict(found, batch_size)[0]
        return probs[0] if cif.is_single(structures) else probs

    def _predict(self, structures: list, batch_size: int):
        """(probabilities per structure, the structures' AtomTable)."""
        if not structures:
            return [], None
        table = features.atom_table(structures, self.k)
        probs = self.predict_table(table, batch_size=batch_size)
        if not np.all(np.isfinite(probs)):
            raise errors.ModelError(f"the {self.source} gives non-finite outputs: it is "
                                    f"damaged or diverged in training; retrain it")
        ends = np.cumsum([s.num_atoms for s in structures])
        return np.split(probs, ends[:-1]), table

    @property
    def num_members(self) -> int:
        """How many models are averaged (1 unless an ensemble)."""
        return len(self._forward)

    def predict_table(self, table: features.AtomTable, rows: np.ndarray | None = None,
                      batch_size: int = 4096) -> np.ndarray:
        """(R, C) probabilities of the atoms at `rows` (default: all) of a feature table."""
        rows = np.arange(len(table)) if rows is None else np.asarray(rows)
        classes = len(self.elements)
        if self.num_members == 1:
            return member_forward.predict(self._forward[0], table, rows, classes, batch_size,
                                          self.temperature)
        mean = np.mean([member_forward.predict(member, table, rows, classes, batch_size)
                        for member in self._forward], axis=0)
        if self.temperature == 1.0 or len(mean) == 0:
            return mean.astype(np.float32)
        return calibration.apply_temperature(mean, self.temperature)

    def check(self, structures, *, per_atom: bool = False, batch_size: int = 4096,
              threshold: float | None = None,
              adjacent_threshold: float | None = None) -> Scores:
        """Per-site (or per-atom) scores of every structure (one, or a list; cryknn
        Structures, ase.Atoms or pymatgen Structures): what `cryknn check` prints."""
        return self.score(structures, per_atom=per_atom, batch_size=batch_size,
                          threshold=threshold, adjacent_threshold=adjacent_threshold)

    def score(self, structures, *, per_atom: bool = False, batch_size: int = 4096,
              progress=None, chunk: int = 64, threshold: float | None = None,
              adjacent_threshold: float | None = None) -> Scores:
        """Per-site (or per-atom) scores of every structure; the same as `check` (scores,
        not a metric as in scikit-learn). Sites are flagged by the model's checking rule,
        with threshold / adjacent_threshold in place of its own where given (`rule_with`).
        progress(done, total): called after every `chunk` structures, which are then
        scored a chunk at a time."""
        structures = cif.as_structures(structures)
        rule = self.rule_with(threshold, adjacent_threshold)
        scores = Scores()
        for part in (structures,) if progress is None else util.chunked(structures, chunk):
            probs, table = self._predict(part, batch_size)
            scores.extend(self._scores(part, table, np.concatenate(probs) if probs else None,
                                       per_atom, rule))
            if progress is not None:
                progress(len(part), len(structures))
        return scores

    def _scores(self, structures: Sequence[cif.Structure],
                table: features.AtomTable | None, probs: np.ndarray | None,
                per_atom: bool, rule: CheckRule) -> Scores:
        """Scores of structures from their table's (A, C) probabilities."""
        if table is None:
            return Scores()
        in_domain = self.in_domain(table)
        starts = np.cumsum([0] + [s.num_atoms for s in structures])
        return Scores(self._score_one(s, probs[a:a + s.num_atoms],
                                      table.distances[a:a + s.num_atoms, 0], per_atom,
                                      in_domain[a:a + s.num_atoms], rule)
                      for s, a in zip(structures, starts))

    def _score_one(self, s: cif.Structure, probs: np.ndarray,
                   first_distance: np.ndarray, per_atom: bool, in_domain: np.ndarray,
                   rule: CheckRule) -> StructureScore:
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
        means = np.stack([probs[atoms].mean(axis=0) for atoms in groups])
        first = np.array([atoms[0] for atoms in groups])
        ratios = p_vs_adjacent(means, s.numbers[first], self.saved.atomic_numbers)
        sites = []
        for atoms, mean, ratio in zip(groups, means, ratios):
            best, c = int(np.argmax(mean)), int(given_class[atoms[0]])
            p_given = float(mean[c]) if c >= 0 else None
            flag = ("outside_domain" if p_given is None or not in_domain[atoms].all() else
                    "implausible" if rule.score(p_given, ratio) < 1 else "")
            ratio = None if np.isnan(ratio) else float(ratio)
            sites.append(SiteScore(
                s.id, labels[atoms[0]], elements_lib.symbol(int(s.numbers[atoms[0]])),
                self.elements[best], float(mean[best]), p_given,
                len(atoms), int(s.site_index[atoms[0]]) + 1,
                atoms[0] if per_atom else None, top=self._top(mean), flag=flag,
                p_vs_adjacent=ratio))
        return StructureScore(s.id, sites, plausibility, int(modelled.sum()), s.num_atoms,
                              structure_warnings(s, first_distance))


def _site_labels(s: cif.Structure) -> list[str]:
    """Each atom's site label, with '#<row>' (1-based atom-site row) where sites share it."""
    rows_of_label: dict[str, set] = {}
    for label, row in zip(s.labels, s.site_index):
        rows_of_label.setdefault(str(label), set()).add(int(row))
    return [str(label) if len(rows_of_label[str(label)]) == 1 else f"{label}#{int(row) + 1}"
            for label, row in zip(s.labels, s.site_index)]


def structure_warnings(s: cif.Structure, first_distance: np.ndarray) -> list[str]:
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
        what = cif.POLICY_REMOVALS.get(policy, policy)
        warnings.append(f"reading removed {n} atoms: {what}")
    return warnings + list(getattr(s, "notes", ()))


# Floats of model inputs per forward pass at most (~256 MB): a model with a wide
# neighbourhood (large k, many hops) scores fewer atoms per pass.
MAX_BATCH_INPUT_FLOATS = 2**26


def score_isolated(model: Model, structures: Sequence[cif.Structure], *,
                   per_atom: bool = False, batch_size: int = 4096, chunk: int = 256,
                   progress=None, threshold: float | None = None,
                   adjacent_threshold: float | None = None
                   ) -> tuple[Scores, list[cif.Skip]]:
    """Model.score, `chunk` structures at a time, skipping (with the reason) each one
    that cannot be featurised instead of failing them all. Returns (scores, skips).
    progress(done, total): called after every chunk with the structures it held.
    threshold, adjacent_threshold: as in Model.score."""
    batch_size = max(1, min(batch_size, MAX_BATCH_INPUT_FLOATS
                            // saved_model.input_floats(model.saved.config)))
    scores, skips = Scores(), []
    rule = model.rule_with(threshold, adjacent_threshold)
    for part in util.chunked(structures, chunk):
        kept, found, bad = neighbours.featurize_isolated(part, model.k)
        skips.extend(bad)
        if progress is not None:
            progress(len(part), len(structures))
        if not kept:
            continue
        table = features.table_from(kept, found, model.k)
        probs = model.predict_table(table, batch_size=batch_size)
        if not np.all(np.isfinite(probs)):  # the inputs are finite: the model is at fault
            raise errors.ModelError(f"the {model.source} gives non-finite outputs: it is "
                                    f"damaged or diverged in training; retrain it")
        scores.extend(model._scores(kept, table, probs, per_atom, rule))
    return scores, skips
