"""Symmetry operations of a data block (listed operations, Hall, H-M, IT number) and the
symmetry images of its sites."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import gemmi
import numpy as np

from cryknn import geometry
from cryknn.cif import values
from cryknn.cif.values import BlockSkip

# Atoms a unit cell may have after symmetry expansion (the largest real cells: ~10^5).
MAX_ATOMS = 2**21
_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz")
_HALL_TAGS = ("_space_group_name_Hall", "_symmetry_space_group_name_Hall")
_HM_TAGS = ("_space_group_name_H-M_alt", "_symmetry_space_group_name_H-M")
_NUMBER_TAGS = ("_space_group_IT_number", "_symmetry_Int_Tables_number")
_DEN = 24  # gemmi.Op.DEN: rotations and translations are integers over 24
_MAX_OPS = 192


def _op_keys(rot: np.ndarray, tran: np.ndarray) -> np.ndarray:
    """One int64 per operation: integer rotation entries (-8..7, 4 bits each) and
    translations in 1/24 modulo 1 (5 bits each)."""
    digits = np.concatenate([rot.reshape(-1, 9) + 8, tran.reshape(-1, 3) % _DEN], axis=1)
    weights = np.array([16 ** k for k in range(9)] + [16 ** 9 * 32 ** k for k in range(3)],
                       dtype=np.float64)
    return np.rint(digits.astype(np.float64) @ weights).astype(np.int64)  # < 2**51: exact


def _as_group(ops: list[gemmi.Op]) -> tuple[np.ndarray, np.ndarray]:
    """gemmi ops -> read-only (rot (M, 3, 3), tran (M, 3)) float64, identity first.

    Duplicates (equal modulo lattice translations) are removed; the list must be a
    group modulo lattice translations, else ValueError.
    """
    rot24 = np.array([op.rot for op in ops], dtype=np.int64).reshape(-1, 3, 3)
    if np.any(rot24 % _DEN):
        raise ValueError("an operation has a non-integer rotation part")
    rot = rot24 // _DEN
    tran = np.array([op.tran for op in ops], dtype=np.int64).reshape(-1, 3) % _DEN
    if np.any(np.abs(rot) > 7):
        raise ValueError("an operation has a rotation entry beyond +-7")
    dets = np.round(np.linalg.det(rot.astype(np.float64))).astype(int)
    if not np.all(np.abs(dets) == 1):
        raise ValueError("an operation is not a rotation (determinant not +-1)")
    keys = _op_keys(rot, tran)
    _, first = np.unique(keys, return_index=True)
    first.sort()
    rot, tran, keys = rot[first], tran[first], keys[first]
    identity = keys == _op_keys(np.eye(3, dtype=np.int64)[None], np.zeros((1, 3), np.int64))[0]
    if not identity.any():
        raise ValueError("the identity operation x,y,z is missing")
    order = np.argsort(~identity, kind="stable")
    rot, tran = rot[order], tran[order]
    if len(rot) > _MAX_OPS:
        raise ValueError(f"{len(rot)} distinct operations (a space group has at most 192)")
    # Closure: every product R_i (R_j x + t_j) + t_i must be in the list.
    m = len(rot)
    rot_f = rot.astype(np.float64)
    # (M*3, 3) @ (3, M*3) in one BLAS call: [i, a, j, c] = sum_b R_i[a, b] R_j[b, c]
    prod_rot = (rot_f.reshape(m * 3, 3) @ rot_f.transpose(1, 0, 2).reshape(3, m * 3))
    prod_rot = np.rint(prod_rot).astype(np.int64).reshape(m, 3, m, 3).transpose(0, 2, 1, 3)
    prod_tran = np.rint(rot_f.reshape(m * 3, 3) @ tran.T.astype(np.float64)).astype(np.int64)
    prod_tran = prod_tran.reshape(m, 3, m).transpose(0, 2, 1) + tran[:, None, :]
    if np.any(np.abs(prod_rot) > 7) or not np.all(np.isin(_op_keys(prod_rot, prod_tran), keys)):
        raise ValueError(f"the {len(rot)} operations are not closed under composition")
    tran_f = tran.astype(np.float64) / _DEN
    rot_f.flags.writeable = False
    tran_f.flags.writeable = False
    return rot_f, tran_f


@functools.lru_cache(maxsize=4096)
def _ops_from_triplets(triplets: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    ops = []
    for triplet in triplets:
        try:
            ops.append(gemmi.Op(triplet))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"bad operation {triplet!r} ({err})") from None
    return _as_group(ops)


@functools.lru_cache(maxsize=1024)
def _ops_from_hall(hall: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _as_group(list(gemmi.symops_from_hall(hall)))
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"Hall symbol {hall!r} not understood ({err})") from None


def _hm_variants(hm: str) -> Iterator[str]:
    """The H-M symbol as written, then with common typing variants undone:
    'P2_1/n' and 'P2(1)/c' (subscripts) -> 'P21/n', 'P21/c'; 'P 21 /m' -> 'P 21/m'."""
    yield hm
    fixed = re.sub(r"(\d)\((\d)\)", r"\1\2", hm.replace("_", ""))
    fixed = re.sub(r"\s*/\s*", "/", fixed)
    if fixed != hm:
        yield fixed


@functools.lru_cache(maxsize=1024)
def _ops_from_hm(hm: str, alpha: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    sg = None
    for variant in _hm_variants(hm):
        try:
            sg = gemmi.find_spacegroup_by_name(variant, alpha, gamma, "2")
        except (RuntimeError, ValueError):
            sg = None
        if sg is not None:
            break
    if sg is None:
        raise ValueError(f"H-M symbol {hm!r} not found in gemmi's table")
    return _as_group(list(sg.operations()))


@functools.lru_cache(maxsize=256)
def _ops_from_number(number: int) -> tuple[np.ndarray, np.ndarray]:
    sg = gemmi.find_spacegroup_by_number(number) if 1 <= number <= 230 else None
    if sg is None:
        raise ValueError(f"space group number {number} not in 1..230")
    return _as_group(list(sg.operations()))


_P1 = _ops_from_triplets(("x,y,z",))


def operations(block, cell: gemmi.UnitCell) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry operations of a block: (rot (M, 3, 3), tran (M, 3)), identity first.

    Sources in order: the listed operations, the Hall symbol, the H-M symbol (origin
    choice 2 preferred, as gemmi does); the IT number only when none of those is given.
    No symmetry information at all means P1.
    """
    problems = []
    for tag in _SYMOP_TAGS:
        column = block.find_values(tag)
        if column:
            triplets = tuple(t.strip() for t in values.unquote(column)
                             if t.strip() not in values.NULLS)
            if triplets:
                try:
                    return _ops_from_triplets(triplets)
                except ValueError as err:
                    problems.append(f"symmetry operations: {err}")
            break
    hall = values.first_value(block, _HALL_TAGS)
    if hall:
        try:
            return _ops_from_hall(hall)
        except ValueError as err:
            problems.append(str(err))
    hm = values.first_value(block, _HM_TAGS)
    if hm:
        try:
            return _ops_from_hm(hm, cell.alpha, cell.gamma)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise BlockSkip("unrecognised space group: " + "; ".join(problems))
    number = values.first_value(block, _NUMBER_TAGS)
    if number:
        try:
            return _ops_from_number(int(number))
        except ValueError as err:
            raise BlockSkip(f"unrecognised space group: {err}") from None
    return _P1


def greedy_keep(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Keep mask (n,): walking atoms in index order, an atom is dropped when it is
    paired (i < j) with an earlier atom that is kept (gemmi's merging rule).

    Evaluated by fixed-point iteration: after t rounds every atom at depth < t in the
    pair graph is final, and cliques of coinciding copies settle in two rounds.
    """
    keep = np.ones(n, dtype=bool)
    while i.size:
        dropped = np.zeros(n, dtype=bool)
        dropped[j[keep[i]]] = True
        if np.array_equal(~dropped, keep):
            break
        keep = ~dropped
    return keep


def site_images(frac: np.ndarray, rot: np.ndarray, tran: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """All symmetry copies of the sites, wrapped into [0, 1), in site then operation
    order; copies on exact special positions (equal to rounding error) appear once.

    Args:
      frac: (S, 3) fractional coordinates of the asymmetric-unit sites.
      rot, tran: (M, 3, 3), (M, 3) operations, identity first.
    Returns:
      frac (N, 3), parent (N,) index of the site each copy comes from.
    """
    num_sites, num_ops = frac.shape[0], rot.shape[0]
    if num_sites * num_ops > MAX_ATOMS:
        raise BlockSkip(f"too many atoms: {num_sites} sites x {num_ops} symmetry operations "
                        f"= {num_sites * num_ops} atoms (limit {MAX_ATOMS})")
    if num_ops == 1:
        return geometry.wrap(frac), np.arange(num_sites)
    images = geometry.wrap(np.einsum("mij,nj->nmi", rot, frac) + tran).reshape(-1, 3)  # (S*M, 3)
    parent = np.repeat(np.arange(num_sites), num_ops)
    # Dropping a repeat of a site's earlier copy is what the tolerance merge would do
    # anyway; doing it exactly first keeps the distance search small.
    grid = np.rint(images * (1 << 20)).astype(np.int64) % (1 << 20)
    index = np.arange(images.shape[0])
    order = np.lexsort((index, grid[:, 2], grid[:, 1], grid[:, 0], parent))
    rows = np.column_stack([parent, grid])[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = np.any(rows[1:] != rows[:-1], axis=1)
    distinct = np.sort(order[first])
    return images[distinct], parent[distinct]

