"""Choosing the checking threshold (cryknn.checking): element swaps change whole sites to
neighbours in Z."""

from __future__ import annotations

import numpy as np

from cryknn import checking
from cryknn import features


def _tiny_table():
    """Two structures: a C-C-O chain of three atoms (sites 0, 0, 1) and an N-H pair."""
    nbr = np.array([[1, 2], [0, 2], [1, 0], [4, 4], [3, 3]])
    return features.AtomTable(
        distances=np.ones((5, 2), np.float32), neighbour_index=nbr.astype(np.int32),
        atomic_number=np.array([6, 6, 8, 7, 1], np.int32),
        structure_index=np.array([0, 0, 0, 1, 1], np.int32),
        site_label=np.array([b"C1", b"C1", b"O1", b"N1", b"H1"]),
        structure_id=np.array(["a:a", "b:b"]), site=np.array([0, 0, 1, 2, 3]))


def test_swaps_change_whole_sites_to_neighbours_in_z():
    table = _tiny_table()
    swaps = checking.pick_swaps(table, [1, 6, 7, 8, 9], seed=0)
    assert swaps.structure.tolist() == [0, 1]
    z = swaps.table.atomic_number
    changed = z != table.atomic_number
    assert changed[3] and z[3] in (6, 8)  # N -> C or O; H is never swapped
    assert changed[0] == changed[1] and (changed[0] or changed[2])  # a whole site
    assert changed[0] or z[2] in (7, 9)
    assert checking.partners([6, 7])[6] == [7] and 8 not in checking.partners([6, 7])
    only = np.zeros(5, bool)
    only[2] = True
    assert checking.affected_rows(table, only, 0).tolist() == [2]
    assert checking.affected_rows(table, only, 1).tolist() == [0, 1, 2]
