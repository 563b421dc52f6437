"""How well the checker separates real structures from ones with a mis-assigned atom, and
fitting what a saved model needs to check structures (calibration, domain, threshold).

  swaps = pick_swaps(table, model, seed=0)       # one Z+-1 swap per structure
  run = CheckRun.of(model, table)                # clean + swapped site p(given), domain
  run.rates(threshold)                           # false alarms and detection
  calibrate_saved_model('workdir/model')         # temperature, domain, threshold -> model.json

The classic mistake of X-ray crystallography is an atom given the element next to it in
Z, whose electron density is alike: `SWAP_PAIRS`. A swap changes the element of every
atom of one site; a geometry-only model's answer changes only at that site, a masked-atom
model's also at the atoms that see it as a neighbour (up to its hops), which are
predicted again. Everything goes through the public scoring path
(`scoring.Model.predict_table` on an `features.AtomTable`).

A site is flagged `implausible` when it is in the model's domain (`Model.in_domain`) and
its mean p(given) over its atoms is below the threshold; a structure is flagged when any
site is.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cryknn import calibration
from cryknn import elements as elements_lib
from cryknn import features
from cryknn import saved_model
from cryknn import scoring
from cryknn import util

SWAP_PAIRS = (("C", "N"), ("N", "O"), ("O", "F"), ("P", "S"), ("S", "Cl"), ("Mn", "Fe"),
              ("Fe", "Co"), ("Co", "Ni"), ("Ni", "Cu"), ("Cu", "Zn"), ("Ag", "Cd"),
              ("Cd", "In"))
TARGET_STRUCTURE_FALSE_ALARMS = 0.05  # the target on real structures
THRESHOLDS = np.geomspace(1e-6, 0.5, 400)


def partners(modelled: list[int]) -> dict[int, list[int]]:
    """{Z: [Z' it is swapped with]} over SWAP_PAIRS with both elements modelled."""
    out: dict[int, list[int]] = {}
    for a, b in SWAP_PAIRS:
        za, zb = elements_lib.atomic_number(a), elements_lib.atomic_number(b)
        if za in modelled and zb in modelled:
            out.setdefault(za, []).append(zb)
            out.setdefault(zb, []).append(za)
    return out


def atom_sites(table: features.AtomTable) -> np.ndarray:
    """(A,) site of every atom numbered across the table (every atom its own without)."""
    return np.arange(len(table)) if table.site is None else np.asarray(table.site)


@dataclasses.dataclass
class Swaps:
    site: np.ndarray  # (W,) swapped site (numbered as atom_sites) of each swapped structure
    structure: np.ndarray  # (W,) its structure index
    new_number: np.ndarray  # (W,) the element it is given
    table: features.AtomTable  # every swap applied (structures are independent)


def pick_swaps(table: features.AtomTable, modelled: list[int], seed: int = 0,
               eligible: np.ndarray | None = None) -> Swaps:
    """One swap per structure that has a site of a swappable element (among the atoms
    `eligible` (A,) bool, default all): a random such site, a random partner element."""
    rng = np.random.default_rng(seed)
    pairs = partners(modelled)
    site = atom_sites(table)
    ok = np.isin(table.atomic_number, list(pairs))
    if eligible is not None:
        ok &= eligible
    numbers = table.atomic_number.copy()
    chosen, structures, new = [], [], []
    candidates = np.flatnonzero(ok)
    order = np.argsort(table.structure_index[candidates], kind="stable")
    by_structure = np.split(candidates[order], np.flatnonzero(
        np.diff(table.structure_index[candidates][order])) + 1) if len(candidates) else []
    for atoms in by_structure:
        atom = int(rng.choice(atoms))
        z = int(rng.choice(pairs[int(table.atomic_number[atom])]))
        numbers[site == site[atom]] = z
        chosen.append(site[atom])
        structures.append(int(table.structure_index[atom]))
        new.append(z)
    return Swaps(np.asarray(chosen, np.int64), np.asarray(structures, np.int64),
                 np.asarray(new, np.int32), dataclasses.replace(table, atomic_number=numbers))


def affected_rows(table: features.AtomTable, changed: np.ndarray, hops: int) -> np.ndarray:
    """Rows whose masked-atom inputs (neighbours up to `hops`) include a `changed` (A,) atom,
    and the changed atoms themselves."""
    hit = changed.copy()
    index = np.arange(len(table))[:, None]
    for _ in range(hops):
        index = table.neighbour_index[index].reshape(len(table), -1)
        hit |= changed[index].any(axis=1)
    return np.flatnonzero(hit)


def p_given_atoms(model: scoring.Model, probs: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """(A,) probability of each atom's own element; NaN where it is not modelled."""
    class_of = np.full(119, -1)
    class_of[model.saved.atomic_numbers] = np.arange(len(model.elements))
    c = class_of[numbers]
    return np.where(c >= 0, probs[np.arange(len(c)), np.maximum(c, 0)], np.nan)


def site_means(values: np.ndarray, site: np.ndarray, sites: int) -> np.ndarray:
    """(sites,) mean of per-atom values over each site's atoms."""
    count = np.bincount(site, minlength=sites)
    return np.bincount(site, values, minlength=sites) / np.maximum(count, 1)


def first_atoms(site: np.ndarray) -> np.ndarray:
    """(sites,) the first atom (row) of each site, site (A,) numbered as `atom_sites`."""
    sites = int(site.max()) + 1 if len(site) else 0
    first = np.zeros(sites, np.int64)
    first[site[::-1]] = np.arange(len(site))[::-1]
    return first


def least_per_structure(score: np.ndarray, checkable: np.ndarray,
                        site_structure: np.ndarray, structures: int) -> np.ndarray:
    """(S,) least score over each structure's checkable sites (inf where none)."""
    out = np.full(structures, np.inf)
    np.minimum.at(out, site_structure[checkable], score[checkable])
    return out


@dataclasses.dataclass
class CheckRun:
    """p(given) of every site of real structures and of the same structures with one Z+-1
    swap each (every swap at once: structures are independent). A site's score is
    p(given) / scale[its element] (`scale` (119,), 1 everywhere unless per-element
    thresholds are fitted: `element_scale`); a site is flagged at threshold t when its
    score is below t; sites that cannot be flagged (element not modelled, outside the
    domain) never are."""

    site_p: np.ndarray  # (sites,) mean p(given) of each real site
    site_number: np.ndarray  # (sites,) its element
    swapped_p: np.ndarray  # (sites,) the same after the swaps
    swapped_number: np.ndarray  # (sites,) the elements after the swaps
    checkable: np.ndarray  # (sites,) bool: modelled and in the domain
    modelled: np.ndarray  # (sites,) bool: the site's element is modelled
    site_structure: np.ndarray  # (sites,) structure of each site
    swapped_site: np.ndarray  # (W,) the swapped site of each swapped structure
    swapped_structure: np.ndarray  # (W,) which structure
    scale: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(119))

    @classmethod
    def of(cls, model: scoring.Model, table: features.AtomTable,
           probs: np.ndarray | None = None, seed: int = 0) -> "CheckRun":
        """probs: (A, C) the model's probabilities of the table's atoms, when known."""
        probs = model.predict_table(table) if probs is None else probs
        site = atom_sites(table)
        first = first_atoms(site)
        sites = len(first)
        p_atom = p_given_atoms(model, probs, table.atomic_number)
        ok = model.in_domain(table) & np.isfinite(p_atom)
        swaps = pick_swaps(table, model.saved.atomic_numbers, seed)
        changed = swaps.table.atomic_number != table.atomic_number
        rows = affected_rows(table, changed, model.spec.receptive_hops
                             if model.spec.neighbour_elements else 0)
        p_swapped = p_atom.copy()
        if len(rows):
            p_swapped[rows] = p_given_atoms(model, model.predict_table(swaps.table, rows),
                                            swaps.table.atomic_number[rows])
        mean = lambda p: site_means(np.nan_to_num(p, nan=1.0), site, sites)  # noqa: E731
        return cls(mean(p_atom), table.atomic_number[first], mean(p_swapped),
                   swaps.table.atomic_number[first],
                   site_means(ok.astype(float), site, sites) > 0.999,
                   site_means(np.isfinite(p_atom).astype(float), site, sites) > 0.999,
                   table.structure_index[first].astype(np.int64), swaps.site,
                   swaps.structure)

    @property
    def structures(self) -> int:
        return int(self.site_structure.max()) + 1 if len(self.site_structure) else 0

    def scores(self, swapped: bool = False) -> np.ndarray:
        """(sites,) p(given) / scale of every site (inf where it cannot be flagged)."""
        p, z = (self.swapped_p, self.swapped_number) if swapped else (self.site_p,
                                                                      self.site_number)
        return np.where(self.checkable, p / self.scale[z], np.inf)

    def structure_min(self) -> np.ndarray:
        """(S,) least site score of each real structure."""
        return least_per_structure(self.scores(), self.checkable, self.site_structure,
                                   self.structures)

    def swapped_min(self) -> np.ndarray:
        """(W,) least site score of each swapped structure."""
        return least_per_structure(self.scores(True), self.checkable,
                                   self.site_structure, self.structures)[self.swapped_structure]

    def pairs(self) -> np.ndarray:
        """(W,) 'C->N', ... the swap of each swapped structure."""
        return np.asarray([f"{elements_lib.symbol(int(a))}->{elements_lib.symbol(int(b))}"
                           for a, b in zip(self.site_number[self.swapped_site],
                                           self.swapped_number[self.swapped_site])], str)

    def rates(self, threshold: float) -> dict:
        """Shares flagged at threshold: real sites (of all sites), real structures,
        swapped structures (detection) and the swapped sites themselves."""
        return {"threshold": float(threshold),
                "real_sites_flagged": _share(self.scores() < threshold),
                "real_structures_flagged": _share(self.structure_min() < threshold),
                "swap_detection": _share(self.swapped_min() < threshold),
                "swapped_site_flagged": _share(self.scores(True)[self.swapped_site]
                                               < threshold)}

    def summary(self, threshold: float) -> dict:
        """rates, the ROC AUCs (site: swapped sites against real modelled sites; structure:
        swapped against real structures) and how many sites are outside the domain."""
        return {**self.rates(threshold), "sites": int(len(self.site_p)),
                "structures": self.structures, "swapped_structures": int(len(
                    self.swapped_site)),
                "sites_outside_domain": _share(~self.checkable),
                "modelled_sites_outside_domain": _share(~self.checkable[self.modelled]),
                "site_auc": roc_auc(-self.scores(True)[self.swapped_site],
                                    -self.scores()[self.modelled]),
                "structure_auc": roc_auc(-self.swapped_min(), -self.structure_min())}

    def curve(self, thresholds: np.ndarray = THRESHOLDS) -> dict:
        """Structure false-alarm rate and swap detection at each threshold."""
        real, swapped = self.structure_min(), self.swapped_min()
        return {"threshold": thresholds.tolist(),
                "real_structures_flagged": [_share(real < t) for t in thresholds],
                "swap_detection": [_share(swapped < t) for t in thresholds]}


def _share(flags: np.ndarray) -> float | None:
    """The share of True in flags (None when empty)."""
    return float(np.mean(flags)) if len(flags) else None


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    from scipy.stats import rankdata

    if len(positive) == 0 or len(negative) == 0:
        return None
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def choose_threshold(run: CheckRun, target: float = TARGET_STRUCTURE_FALSE_ALARMS,
                     thresholds: np.ndarray = THRESHOLDS) -> float:
    """The largest threshold (most swaps caught) at which at most `target` of the real
    structures have a flagged site."""
    real = run.structure_min()
    ok = [t for t in thresholds if np.mean(real < t) <= target]
    return float(max(ok)) if ok else float(thresholds[0])


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size, replace=False)) if n > size else np.arange(n)


def fit_domain(model: scoring.Model, train: features.AtomTable,
               validation: features.AtomTable, *, reference_atoms: int = 20_000,
               quantile: float = 0.99, seed: int = 0) -> calibration.DomainReference:
    """The domain reference: `reference_atoms` random training atoms (any element); the
    cutoff is the `quantile` of the domain scores of validation atoms."""
    rng = np.random.default_rng(seed)
    k = model.k
    rows = _sample(len(train), reference_atoms, rng)
    found = calibration.features(train.distances, train.neighbour_index, train.atomic_number,
                                 k, rows)
    check = _sample(len(validation), 100_000, rng)
    against = calibration.features(validation.distances, validation.neighbour_index,
                                   validation.atomic_number, k, check)
    return calibration.DomainReference.fit(found, against, quantile)


def _uncalibrated(model_dir: str) -> scoring.Model:
    saved = saved_model.load(model_dir)
    info = {key: value for key, value in saved.info.items()
            if key not in (calibration.KEY, "checking")}
    return scoring.Model(dataclasses.replace(saved, info=info, folder=None),
                         f"saved model {model_dir}")


def calibrate_saved_model(model_dir: str, data_dir: str | None = None,
                          dataset: str | None = None, *, fit_atoms: int = 200_000,
                          seed: int = 0, log=print) -> dict:
    """Fits, on the validation split of the model's dataset (or `dataset`, built in
    `data_dir`), the temperature, the domain (reference sample from the training split)
    and the checking threshold (most Z+-1 swaps caught with at most 5 % of real structures
    flagged), and adds them to model_dir's model.json (`calibration`, `checking`) and
    domain.npz. Returns what it added. Refitting replaces an earlier fit."""
    model = _uncalibrated(model_dir)
    saved = model.saved
    dataset = dataset or saved.config.dataset
    data_dir = data_dir or saved.config.data_dir
    fingerprint = saved.info.get("dataset_fingerprint") or saved.run.get("dataset_fingerprint")
    load = lambda split: features.load_features(  # noqa: E731
        dataset, split, model.k, fingerprint=fingerprint, data_dir=data_dir, log=log)
    validation = load("validation")
    probs = model.predict_table(validation)
    p_atom = p_given_atoms(model, probs, validation.atomic_number)
    class_of = {z: i for i, z in enumerate(saved.atomic_numbers)}
    rows = _sample(len(validation), fit_atoms, np.random.default_rng(seed))
    rows = rows[np.isfinite(p_atom[rows])]
    labels = np.asarray([class_of[int(z)] for z in validation.atomic_number[rows]])
    temperature = calibration.fit_temperature(probs[rows], labels)
    calibrated = calibration.apply_temperature(probs, temperature)
    model.temperature = temperature
    model.domain = fit_domain(model, load("train"), validation, seed=seed)
    run = CheckRun.of(model, validation, calibrated, seed=seed)
    threshold = choose_threshold(run)
    added = {calibration.KEY: {
        "temperature": temperature, "fitted_on": "validation", "dataset": dataset,
        "dataset_fingerprint": fingerprint, "atoms": int(len(rows)),
        "nll_before": calibration.negative_log_likelihood(probs[rows], labels),
        "nll_after": calibration.negative_log_likelihood(probs[rows], labels, temperature),
        "ece_before": calibration.expected_calibration_error(probs[rows], labels),
        "ece_after": calibration.expected_calibration_error(calibrated[rows], labels),
        "domain": {"file": calibration.DOMAIN_FILE, "feature": calibration.DOMAIN_FEATURE,
                   "reference_atoms": int(len(model.domain.sample)), "quantile": 0.99,
                   "cutoff": model.domain.cutoff}},
             "checking": {"chosen_on": "validation", "target_structures_flagged":
                          TARGET_STRUCTURE_FALSE_ALARMS, **run.summary(threshold)}}
    model.domain.save(os.path.join(model_dir, calibration.DOMAIN_FILE))
    util.write_json(os.path.join(model_dir, saved_model.MODEL_JSON),
                    {**model.saved.info, **added})
    found = added["checking"]
    caught = ("no swappable site" if found["swap_detection"] is None
              else f"catches {found['swap_detection']:.1%} of single Z+-1 swaps")
    log(f"{model_dir}: temperature {temperature:.3f}; threshold p(given) < {threshold:.3g} "
        f"flags {found['real_structures_flagged']:.1%} of validation structures; {caught}")
    return added
