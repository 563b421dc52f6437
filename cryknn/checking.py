"""How well the checker separates real structures from ones with a mis-assigned atom, and
fitting what a saved model needs to check structures (calibration, domain, threshold).

  swaps = pick_swaps(table, model, seed=0)       # one Z+-1 swap per structure
  run = CheckRun.of(model, table)                # clean + swapped site p(given), domain
  run.rates(rule)                                # false alarms and detection
  calibrate_saved_model('workdir/model')         # temperature, domain, rule -> model.json

The classic mistake of X-ray crystallography is an atom given the element next to it in
Z, whose electron density is alike: `SWAP_PAIRS` (`elements.ADJACENT_Z_PAIRS`). A swap
changes the element of every atom of one site; a geometry-only model's answer changes only
at that site, a masked-atom model's also at the atoms that see it as a neighbour (up to
its hops), which are predicted again. Everything goes through the public scoring path
(`scoring.Model.predict_table` on an `features.AtomTable`).

A site is flagged `implausible` when it is in the model's domain (`Model.in_domain`) and
the model's `scoring.CheckRule` says so of its mean probabilities over its atoms: p(given)
below the threshold, or p(given) / (p(given) + p(its Z+-1 neighbour)) below the adjacent
threshold; a structure is flagged when any site is. `choose_rule` sets the first to flag
FLOOR_STRUCTURES of the real validation structures alone (a floor for any unlikely
element) and the second at equal margins to both targets, TARGET_STRUCTURE_FALSE_ALARMS
of the real structures flagged and TARGET_SWAP_DETECTION of the swaps caught: a rule
fitted to flag exactly 5 % of validation's structures leaves no room for a set a little
harder than validation.
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

SWAP_PAIRS = elements_lib.ADJACENT_Z_PAIRS
TARGET_STRUCTURE_FALSE_ALARMS = 0.05  # the target on real structures
TARGET_SWAP_DETECTION = 0.90  # and on structures with one Z+-1 swap
# The share of real structures the p(given) threshold alone may flag: chosen on validation
# (docs/results.md A0.5), it keeps any very unlikely element flagged at no cost in
# detection of Z+-1 swaps (95.5 % with floors that flag 0-2 % alone).
FLOOR_STRUCTURES = 0.01
THRESHOLDS = np.geomspace(1e-6, 0.5, 400)
# Multiples of a rule's thresholds over which detection is traced against false alarms.
RULE_FACTORS = np.geomspace(1e-3, 30, 300)


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
    """p(given) and p_vs_adjacent (`scoring.p_vs_adjacent`) of every site of real
    structures and of the same structures with one Z+-1 swap each (every swap at once:
    structures are independent). A site's score under a rule is `CheckRule.score`, flagged
    below 1; a bare threshold t stands for the rule p(given) < t. Sites that cannot be
    flagged (element not modelled, outside the domain) never are."""

    site_p: np.ndarray  # (sites,) mean p(given) of each real site
    site_number: np.ndarray  # (sites,) its element
    swapped_p: np.ndarray  # (sites,) the same after the swaps
    swapped_number: np.ndarray  # (sites,) the elements after the swaps
    checkable: np.ndarray  # (sites,) bool: modelled and in the domain
    modelled: np.ndarray  # (sites,) bool: the site's element is modelled
    site_structure: np.ndarray  # (sites,) structure of each site
    swapped_site: np.ndarray  # (W,) the swapped site of each swapped structure
    swapped_structure: np.ndarray  # (W,) which structure
    site_ratio: np.ndarray  # (sites,) p_vs_adjacent of each real site (NaN: none)
    swapped_ratio: np.ndarray  # (sites,) the same after the swaps

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
        swapped_probs = probs.copy()
        if len(rows):
            swapped_probs[rows] = model.predict_table(swaps.table, rows)
        p_swapped = p_given_atoms(model, swapped_probs, swaps.table.atomic_number)
        mean = lambda p: site_means(np.nan_to_num(p, nan=1.0), site, sites)  # noqa: E731
        numbers, swapped_numbers = table.atomic_number[first], swaps.table.atomic_number[first]
        return cls(mean(p_atom), numbers, mean(p_swapped), swapped_numbers,
                   site_means(ok.astype(float), site, sites) > 0.999,
                   site_means(np.isfinite(p_atom).astype(float), site, sites) > 0.999,
                   table.structure_index[first].astype(np.int64), swaps.site,
                   swaps.structure,
                   scoring.p_vs_adjacent(site_probs(probs, site, sites), numbers,
                                         model.saved.atomic_numbers),
                   scoring.p_vs_adjacent(site_probs(swapped_probs, site, sites),
                                         swapped_numbers, model.saved.atomic_numbers))

    @property
    def structures(self) -> int:
        return int(self.site_structure.max()) + 1 if len(self.site_structure) else 0

    def scores(self, rule: scoring.CheckRule | float, swapped: bool = False) -> np.ndarray:
        """(sites,) every site's score under the rule, below 1 where flagged (inf where it
        cannot be flagged)."""
        rule = as_rule(rule)
        p, ratio = ((self.swapped_p, self.swapped_ratio) if swapped else
                    (self.site_p, self.site_ratio))
        return np.where(self.checkable, rule.score(p, ratio), np.inf)

    def structure_min(self, rule: scoring.CheckRule | float) -> np.ndarray:
        """(S,) least site score of each real structure (flagged below 1)."""
        return least_per_structure(self.scores(rule), self.checkable, self.site_structure,
                                   self.structures)

    def swapped_min(self, rule: scoring.CheckRule | float) -> np.ndarray:
        """(W,) least site score of each swapped structure (flagged below 1)."""
        return least_per_structure(self.scores(rule, True), self.checkable,
                                   self.site_structure, self.structures)[self.swapped_structure]

    def pairs(self) -> np.ndarray:
        """(W,) 'C->N', ... the swap of each swapped structure."""
        return np.asarray([f"{elements_lib.symbol(int(a))}->{elements_lib.symbol(int(b))}"
                           for a, b in zip(self.site_number[self.swapped_site],
                                           self.swapped_number[self.swapped_site])], str)

    def rates(self, rule: scoring.CheckRule | float) -> dict:
        """The rule's thresholds and the shares it flags: real sites (of all sites), real
        structures, swapped structures (detection) and the swapped sites themselves."""
        rule = as_rule(rule)
        return {**rule_record(rule),
                "real_sites_flagged": _share(self.scores(rule) < 1),
                "real_structures_flagged": _share(self.structure_min(rule) < 1),
                "swap_detection": _share(self.swapped_min(rule) < 1),
                "swapped_site_flagged": _share(self.scores(rule, True)[self.swapped_site]
                                               < 1)}

    def summary(self, rule: scoring.CheckRule | float) -> dict:
        """rates, the ROC AUCs of the rule's score (site: swapped sites against real
        modelled sites; structure: swapped against real structures) and how many sites
        are outside the domain."""
        return {**self.rates(rule), "sites": int(len(self.site_p)),
                "structures": self.structures, "swapped_structures": int(len(
                    self.swapped_site)),
                "sites_outside_domain": _share(~self.checkable),
                "modelled_sites_outside_domain": _share(~self.checkable[self.modelled]),
                "site_auc": roc_auc(-self.scores(rule, True)[self.swapped_site],
                                    -self.scores(rule)[self.modelled]),
                "structure_auc": roc_auc(-self.swapped_min(rule), -self.structure_min(rule))}

    def least_parts(self, swapped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """((S,) or (W,)) least p(given) and least p_vs_adjacent (inf: none) over each real
        (or swapped) structure's checkable sites: under any rule a structure is flagged
        exactly when the first is below its threshold or the second below its adjacent
        threshold."""
        p, ratio = ((self.swapped_p, self.swapped_ratio) if swapped else
                    (self.site_p, self.site_ratio))
        parts = tuple(least_per_structure(v, self.checkable, self.site_structure,
                                          self.structures)
                      for v in (p, np.nan_to_num(ratio, nan=np.inf)))
        return parts if not swapped else tuple(v[self.swapped_structure] for v in parts)

    def subset(self, keep: np.ndarray) -> "CheckRun":
        """The run restricted to the structures `keep` (S,) bool, renumbered in order."""
        sites = keep[self.site_structure]
        new_structure = np.cumsum(keep) - 1
        new_site = np.cumsum(sites) - 1
        swaps = keep[self.swapped_structure]
        per_site = {f.name: getattr(self, f.name)[sites] for f in dataclasses.fields(self)
                    if f.name not in ("site_structure", "swapped_site", "swapped_structure")}
        return CheckRun(**per_site, site_structure=new_structure[self.site_structure[sites]],
                        swapped_site=new_site[self.swapped_site[swaps]],
                        swapped_structure=new_structure[self.swapped_structure[swaps]])

    def curve(self, rule: scoring.CheckRule | float, factors: np.ndarray = RULE_FACTORS) -> dict:
        """Structure false-alarm rate and swap detection with the rule's thresholds all
        multiplied by each factor (for a bare threshold: at factor x threshold)."""
        real, swapped = self.structure_min(rule), self.swapped_min(rule)
        return {"factor": factors.tolist(),
                "real_structures_flagged": [_share(real < f) for f in factors],
                "swap_detection": [_share(swapped < f) for f in factors]}


def as_rule(rule) -> scoring.CheckRule:
    """A CheckRule (a bare threshold t: the rule p(given) < t)."""
    return rule if isinstance(rule, scoring.CheckRule) else scoring.CheckRule(float(rule))


def rule_record(rule: scoring.CheckRule) -> dict:
    """The rule as model.json's checking entry stores it."""
    record = {"threshold": float(rule.threshold)}
    if rule.adjacent_threshold is not None:
        record["adjacent_threshold"] = float(rule.adjacent_threshold)
    return record


def site_probs(probs: np.ndarray, site: np.ndarray, sites: int) -> np.ndarray:
    """(sites, C) mean of the (A, C) probabilities over each site's atoms."""
    return np.stack([site_means(column, site, sites) for column in probs.T], axis=1)


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
    """The largest threshold on p(given) (most swaps caught) at which at most `target` of
    the real structures have a flagged site."""
    flagged = _shares_below(run.least_parts()[0], thresholds)
    ok = thresholds[flagged <= target]
    return float(ok.max()) if len(ok) else float(thresholds[0])


def _shares_below(least: np.ndarray, thresholds: np.ndarray,
                  already: np.ndarray | None = None) -> np.ndarray:
    """(T,) share of the structures whose least score (N,) is below each threshold (T,),
    or already (N,) flagged."""
    below = least[:, None] < np.asarray(thresholds)[None, :]
    if already is not None:
        below |= already[:, None]
    return below.mean(axis=0) if len(least) else np.zeros(len(thresholds))


def choose_rule(run: CheckRun, target: float = TARGET_STRUCTURE_FALSE_ALARMS,
                floor: float = FLOOR_STRUCTURES,
                thresholds: np.ndarray = THRESHOLDS,
                detection_target: float | None = None) -> scoring.CheckRule:
    """The p(given) threshold that alone flags at most `floor` of the real structures,
    then an adjacent threshold: without `detection_target`, the largest with which both
    together flag at most `target`; with it, the one whose smaller margin to the two
    targets (target - share flagged, detection - detection_target) is largest (the
    largest such threshold on a tie), so that neither target is met with no room left.
    Where no threshold meets both on the run, the false-alarm target wins: the rule is
    the one without `detection_target` (a false alarm costs every user, a missed swap
    only the checks of a weaker model)."""
    thresholds = np.asarray(thresholds, float)
    base = scoring.CheckRule(choose_threshold(run, floor, thresholds))
    least_p, least_ratio = run.least_parts()
    flagged = _shares_below(least_ratio, thresholds, least_p < base.threshold)
    within = np.flatnonzero(flagged <= target)
    adjacent = lambda i: dataclasses.replace(  # noqa: E731
        base, adjacent_threshold=float(thresholds[i]))
    at_target = adjacent(within.max()) if len(within) else base
    if detection_target is None or len(run.swapped_site) == 0:
        return at_target
    swapped_p, swapped_ratio = run.least_parts(swapped=True)
    detected = _shares_below(swapped_ratio, thresholds, swapped_p < base.threshold)
    margin = np.minimum(target - flagged, detected - detection_target)
    if margin.max() < 0:
        return at_target
    return adjacent(np.flatnonzero(margin == margin.max()).max())


def operating_point(rates: dict) -> str:
    """How `choose_rule(..., detection_target=TARGET_SWAP_DETECTION)` placed a rule, from
    its rates on the run it was fitted to: both targets met means equal margins."""
    caught = rates["swap_detection"]
    if (rates["real_structures_flagged"] <= TARGET_STRUCTURE_FALSE_ALARMS
            and caught is not None and caught >= TARGET_SWAP_DETECTION):
        return "equal margins"
    return (f"at most {TARGET_STRUCTURE_FALSE_ALARMS:.0%} flagged (both targets out of reach "
            f"on validation)")


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
    and the checking rule (`choose_rule`: equal margins to both targets, at most 5 % of
    real structures flagged and at least 90 % of Z+-1 swaps caught), and adds them to
    model_dir's model.json (`calibration`, `checking`) and domain.npz. Returns what it
    added. Refitting replaces an earlier fit."""
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
    rule = choose_rule(run, detection_target=TARGET_SWAP_DETECTION)
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
                          TARGET_STRUCTURE_FALSE_ALARMS, "target_swap_detection":
                          TARGET_SWAP_DETECTION,
                          "operating_point": operating_point(run.rates(rule)),
                          "floor_structures_flagged": FLOOR_STRUCTURES,
                          **run.summary(rule)}}
    model.domain.save(os.path.join(model_dir, calibration.DOMAIN_FILE))
    util.write_json(os.path.join(model_dir, saved_model.MODEL_JSON),
                    {**model.saved.info, **added})
    found = added["checking"]
    caught = ("no swappable site" if found["swap_detection"] is None
              else f"catches {found['swap_detection']:.1%} of single Z+-1 swaps")
    log(f"{model_dir}: temperature {temperature:.3f}; {rule.describe()} flags "
        f"{found['real_structures_flagged']:.1%} of validation structures; {caught}")
    return added
