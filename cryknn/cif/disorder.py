"""The disorder policies (see `ReadOptions.disorder`): disorder groups (rule 1) and
overlapping partial atoms (rule 2) of policy "majority", and policy "drop"."""

from __future__ import annotations

import numpy as np

from cryknn.cif import sites
from cryknn.cif import values
from cryknn.cif.options import ReadOptions
from cryknn.cif.values import BlockSkip


def _majority_groups(groups: list[str], assemblies: list[str] | None,
                     occ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sites kept / decided by disorder-group selection (policy "majority", rule 1).

    Returns (keep (S,) bool, decided (S,) bool): decided sites belong to a positive
    disorder group of an assembly with at least two groups; of those only the winning
    group of each assembly is kept. A lone group in its assembly is not decided here.
    """
    groups_arr = np.array(groups, dtype=object)
    positive = np.array([g not in values.NULLS and g != "0" and not g.startswith("-")
                         for g in groups], dtype=bool)
    keep = np.ones(len(groups), dtype=bool)
    if not positive.any():
        return keep, positive
    asm = np.array(assemblies if assemblies is not None else [""] * len(groups), dtype=object)
    decided = np.zeros(len(groups), dtype=bool)
    for assembly in dict.fromkeys(asm[positive]):
        in_asm = positive & (asm == assembly)
        names = list(dict.fromkeys(groups_arr[in_asm]))  # order of first appearance
        if len(names) < 2:  # its alternatives are not labelled: leave it to rule 2
            continue
        decided |= in_asm
        means = [occ[in_asm & (groups_arr == g)].mean() for g in names]
        best = names[int(np.argmax(means))]  # argmax: first on ties
        keep &= ~(in_asm & (groups_arr != best))
    return keep, decided


def majority_overlaps(occ: np.ndarray, candidates: np.ndarray, i: np.ndarray,
                      j: np.ndarray) -> np.ndarray:
    """Keep mask (N,) after resolving overlapping partial atoms (policy "majority", rule 2).

    Args:
      occ: (N,) occupancies; candidates: (N,) undecided partial atoms.
      i, j: pairs of atoms closer than the overlap tolerance, at least one a candidate.
    Pairs are alternatives for one place; connected alternatives form a cluster.
    Non-candidate atoms are always kept, and a cluster holding one keeps no candidate (a
    partial atom cannot sit next to an atom that is always there). Otherwise the cluster
    keeps its highest-occupancy candidate (first listed on ties) when the occupancies of
    its candidates sum to >= 0.5.
    """
    n = occ.shape[0]
    keep = ~candidates
    label = np.arange(n)
    while i.size:  # connected components by min-label propagation
        low = np.minimum(label[i], label[j])
        new = label.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    w = np.where(candidates, occ, 0.0).astype(np.float64)
    total = np.bincount(label, weights=w, minlength=n)
    anchored = np.bincount(label, weights=(~candidates).astype(np.float64), minlength=n) > 0
    cand = np.flatnonzero(candidates)
    order = cand[np.lexsort((cand, -w[cand], label[cand]))]  # per cluster: best first
    first = np.ones(order.size, dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    best = order[first]
    keep[best] = ~anchored[label[best]] & (total[label[best]] >= 0.5 - 1e-6)
    return keep




def resolve_groups(table, occ: np.ndarray, options: ReadOptions
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept site rows, rows whose disorder groups decided them, partially occupied rows)
    under the disorder policy's first rule (disorder groups); see ReadOptions."""
    rows = len(occ)
    partial = occ < 1.0 - options.occupancy_tolerance
    groups = values.unquote(table.column(sites.GROUP)) if table.has_column(sites.GROUP) else None
    grouped = (np.array([g not in values.NULLS and g != "0" for g in groups], dtype=bool)
               if groups is not None else np.zeros(rows, dtype=bool))
    if options.disorder == "drop" and (partial.any() or grouped.any()):
        parts = []
        if partial.any():
            parts.append(f"{int(partial.sum())} partially occupied site(s)")
        if grouped.any():
            parts.append(f"{int(grouped.sum())} site(s) in disorder groups")
        raise BlockSkip(f"disorder: {' and '.join(parts)} (disorder='drop')")
    if options.disorder == "majority" and grouped.any():
        assemblies = (values.unquote(table.column(sites.ASSEMBLY))
                      if table.has_column(sites.ASSEMBLY) else None)
        site_keep, decided = _majority_groups(groups, assemblies, occ)
        return np.flatnonzero(site_keep), decided, partial
    return np.arange(rows), np.zeros(rows, dtype=bool), partial

