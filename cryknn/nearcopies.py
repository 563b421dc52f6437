"""Near-copies: one crystal filed under several names, grouped so that it lands in one split.

CoRE MOF (like the CSD it comes from) files the same framework under several refcodes:
re-determinations at another temperature, another group's deposition. The family rule
(`cryknn.families`) goes by name and cannot see them, so a test structure could have its twin
in training. This module finds them by geometry.

The rule (one place, documented and tested):
  Two structures are near-copies when they have the same composition (reduced formula: the
  atom counts per element divided by their greatest common divisor) and their AMD vectors
  agree within `TOLERANCE` (relative, in every component):
      max_i |AMD_i(a) - AMD_i(b)| / ((AMD_i(a) + AMD_i(b)) / 2)  <=  TOLERANCE,   i = 1..AMD_K.
  AMD_i, the average minimum distance, is the mean over the unit cell's atoms of the distance
  to the i-th nearest neighbour in the infinite periodic set (Widdowson et al., MATCH Commun.
  Math. Comput. Chem. 87, 529 (2022)). It is what the exact k-NN already computes, it does not
  depend on the choice of unit cell (a supercell, another setting or origin give the same
  vector) and it moves continuously with the atoms, so a cell 0.5 % larger moves it by 0.5 %.
  Structures that fail to featurise (a degenerate cell) have no AMD and match nothing.

The tolerance, 5 %, is wide enough for what differs between two depositions of one crystal:
temperature (about 1 % in cell lengths) and, above all, hydrogen positions, which X-ray work
puts about 0.95 A from carbon and normalised structures at 1.09 A, moving the first AMD
components by several per cent. On CoRE MOF 2019-ASR it leaves 11 of 1,225 test structures
with a same-composition structure of cell volume per atom within 1 % in train or validation
(206 of 1,230 with families alone; 44 at 3 %, 77 at 2 %).

Polymorphs: two structures of one composition whose first AMD_K = 30 neighbour distances agree
within 5 % on average over all atoms are grouped even if crystallographers call them
polymorphs. That is deliberate: the models see only local geometry (k neighbours over a few
hops, well inside 30 neighbours), so for them such a pair is the same crystal, and splitting
it would leak. Polymorphs whose local environments differ (fcc and bcc, rock salt and CsCl)
stay apart.

Groups: near-copy pairs join the families of the two structures (union-find over families),
so a group is a union of whole families. Its name is its smallest family name, and its split
is `families.split_of(name)`: a family that joins no other keeps its split, and a group's split
does not change when unrelated structures come and go.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from cryknn import families
from cryknn import util

AMD_K = 30  # neighbours in the AMD fingerprint
TOLERANCE = 0.05  # relative, per AMD component
SPLITS_CSV = "splits.csv"
SPLITS_FIELDS = ("structure_id", "family", "group", "split", "family_split")
FINGERPRINTS_NPZ = "fingerprints.npz"


def composition_key(numbers: np.ndarray) -> str:
    """Reduced formula of (N,) atomic numbers, e.g. '1:4,6:1' for CH4 (and for C2H8)."""
    z, counts = np.unique(np.asarray(numbers, np.int64), return_counts=True)
    if z.size == 0:
        return ""
    divisor = math.gcd(*counts.tolist()) if z.size > 1 else int(counts[0])
    return ",".join(f"{a}:{c // divisor}" for a, c in zip(z.tolist(), counts.tolist()))


@dataclasses.dataclass
class Fingerprints:
    """Per structure: id, family, composition and AMD vector.

    Attributes:
      ids: (S,) str structure ids.
      family: (S,) str family names (`families.family_of`).
      composition: (S,) str reduced formulas (`composition_key`).
      amd: (S, AMD_K) float32 AMD vectors; NaN rows for structures that could not be featurised.
    """

    ids: np.ndarray
    family: np.ndarray
    composition: np.ndarray
    amd: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def save(self, path: str) -> None:
        with util.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> "Fingerprints":
        with np.load(path) as f:
            return cls(**{field.name: f[field.name] for field in dataclasses.fields(cls)})

    @classmethod
    def concatenate(cls, parts: Sequence["Fingerprints"]) -> "Fingerprints":
        if not parts:
            return cls(np.zeros(0, str), np.zeros(0, str), np.zeros(0, str),
                       np.zeros((0, AMD_K), np.float32))
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)))


def amd_vectors(lattices: Sequence[np.ndarray], fracs: Sequence[np.ndarray],
                k: int = AMD_K) -> np.ndarray:
    """(S, k) float32 AMD of each cell, NaN where the cell cannot be featurised."""
    from cryknn import errors
    from cryknn import neighbours  # JAX: imported only where fingerprints are computed

    out = np.full((len(lattices), k), np.nan, np.float32)
    good = []
    for i, (lattice, frac) in enumerate(zip(lattices, fracs)):
        try:
            neighbours.validate_cell(lattice, frac)
            good.append(i)
        except errors.FeaturizeError:
            pass
    if good:
        found = neighbours.featurize_arrays([lattices[i] for i in good],
                                            [fracs[i] for i in good], k)
        for i, nb in zip(good, found):
            out[i] = nb.distances.mean(axis=0)
    return out


def fingerprints(structures: Iterable, chunk: int = 2048) -> Fingerprints:
    """Fingerprints of Structures (or anything with id, lattice, frac, numbers)."""
    parts = []
    for batch in util.chunked((s for s in structures if len(s.numbers)), chunk):
        parts.append(Fingerprints(
            ids=np.asarray([s.id for s in batch], dtype=str),
            family=np.asarray([families.family_of(s.id) for s in batch], dtype=str),
            composition=np.asarray([composition_key(s.numbers) for s in batch], dtype=str),
            amd=amd_vectors([np.asarray(s.lattice, np.float64) for s in batch],
                            [np.asarray(s.frac, np.float64) for s in batch])))
    return Fingerprints.concatenate(parts)


def amd_close(a: np.ndarray, b: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """Whether AMD rows agree within `tolerance` (relative, every component); broadcasts
    (..., K) against (..., K). NaN rows agree with nothing."""
    with np.errstate(invalid="ignore"):
        rel = np.abs(a - b) / np.maximum((a + b) / 2, 1e-6)
        return np.all(rel <= tolerance, axis=-1)


def near_copy_pairs(query: Fingerprints, reference: Fingerprints | None = None,
                    tolerance: float = TOLERANCE) -> np.ndarray:
    """(P, 2) int64 pairs (i, j): query[i] and reference[j] are near-copies.

    Without a reference, pairs within `query` (i < j). Work grows with the pairs that share a
    composition and an AMD_K within the tolerance, not with S^2: each composition's structures
    are swept in order of their last AMD component.
    """
    same = reference is None
    reference = query if same else reference
    by_key: dict[str, list[int]] = {}
    for j, key in enumerate(reference.composition.tolist()):
        by_key.setdefault(key, []).append(j)
    pairs = []
    for key, js in by_key.items():
        iq = (np.asarray(js) if same
              else np.flatnonzero(query.composition == key))
        if iq.size == 0:
            continue
        pairs.extend(_bucket_pairs(query.amd, iq, reference.amd, np.asarray(js), same,
                                   tolerance))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def _bucket_pairs(amd_q, iq, amd_r, jr, same: bool, tolerance: float) -> list[tuple[int, int]]:
    """Near-copy pairs between query rows iq and reference rows jr of one composition."""
    last_r = amd_r[jr, -1]
    order = np.argsort(last_r)
    jr, last_r = jr[order], last_r[order]
    # |a - b| <= tol (a + b) / 2 on the last component bounds b to [a (2 - tol) / (2 + tol),
    # a (2 + tol) / (2 - tol)]: only those candidates are compared in full.
    lo = np.searchsorted(last_r, amd_q[iq, -1] * (2 - tolerance) / (2 + tolerance), "left")
    hi = np.searchsorted(last_r, amd_q[iq, -1] * (2 + tolerance) / (2 - tolerance), "right")
    pairs = []
    for i, a, b in zip(iq.tolist(), lo.tolist(), hi.tolist()):
        cands = jr[a:b]
        if same:
            cands = cands[cands > i]
        if cands.size:
            hits = cands[amd_close(amd_q[i][None], amd_r[cands], tolerance)]
            pairs.extend((i, int(j)) for j in hits)
    return pairs


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller name is the root: the group's canonical member
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def family_groups(family: Sequence[str], pairs: np.ndarray) -> dict[str, str]:
    """{family: group name} for every family of a pair; the group name is the smallest
    family name in the group. Families not in any pair are their own group (not listed)."""
    uf = _UnionFind()
    family = np.asarray(family)
    for i, j in pairs.tolist():
        uf.union(str(family[i]), str(family[j]))
    return {f: uf.find(f) for f in list(uf.parent)}


@dataclasses.dataclass(frozen=True)
class SplitTable:
    """The split of every structure of a build, after joining near-copies.

    Attributes:
      group_of: {family: group} for families that joined a group (others are their own).
      rows: (structure_id, family, group, split, family_split) per structure.
      pairs: near-copy pairs found.
      tolerance: the AMD tolerance used.
    """

    group_of: dict[str, str]
    rows: list[tuple[str, str, str, str, str]]
    pairs: int
    tolerance: float

    def split_of_family(self, family: str) -> str:
        return families.split_of(self.group_of.get(family, family))

    def split_of_stem(self, stem: str) -> str:
        """Split of a file (all its blocks share its family)."""
        return self.split_of_family(families.family_of(stem))

    @property
    def moved(self) -> int:
        """Structures whose split differs from their family's own split."""
        return sum(1 for r in self.rows if r[3] != r[4])

    @property
    def grouped(self) -> int:
        """Structures in a group of more than one family."""
        return sum(1 for r in self.rows if r[1] in self.group_of)

    def write_csv(self, path: str) -> None:
        with util.atomic_open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(SPLITS_FIELDS)
            writer.writerows(self.rows)

    def summary(self) -> dict:
        return {"rule": f"same composition and AMD_1..{AMD_K} within {self.tolerance:g} "
                        f"(relative)", "pairs": self.pairs,
                "groups": len(set(self.group_of.values())),
                "structures_grouped": self.grouped, "structures_moved": self.moved}


def split_table(fp: Fingerprints, tolerance: float = TOLERANCE,
                log: Callable[[str], None] | None = None) -> SplitTable:
    """Groups near-copies of a build's fingerprints and gives every structure its split."""
    pairs = near_copy_pairs(fp, tolerance=tolerance)
    group_of = family_groups(fp.family, pairs)
    rows = []
    for sid, fam in zip(fp.ids.tolist(), fp.family.tolist()):
        group = group_of.get(fam, fam)
        rows.append((sid, fam, group, families.split_of(group), families.split_of(fam)))
    table = SplitTable(group_of, rows, int(len(pairs)), tolerance)
    if log:
        s = table.summary()
        log(f"near-copies: {s['pairs']} pairs join {s['structures_grouped']} structures into "
            f"{s['groups']} groups; {s['structures_moved']} structures changed split")
    return table


def read_splits_csv(path: str) -> list[dict]:
    """Rows of a build's splits.csv as dicts (SPLITS_FIELDS)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def copies_of(query: Fingerprints, reference: Fingerprints, reference_splits: dict[str, str],
              tolerance: float = TOLERANCE) -> list[tuple[str, str, str]]:
    """(query id, reference id, reference split) for each near-copy of a reference structure."""
    pairs = near_copy_pairs(query, reference, tolerance)
    return [(str(query.ids[i]), str(reference.ids[j]),
             reference_splits.get(str(reference.ids[j]), ""))
            for i, j in pairs.tolist()]
