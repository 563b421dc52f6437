"""cryknn.knn_calls: call sizes, and where `pack` puts a plan's blocks (the rows run_plan
reads back). The results themselves are checked against the oracle in test_neighbours."""

import numpy as np

from cryknn import knn_calls
from cryknn import knn_plan
from cryknn.knn_plan import QUERY_BLOCK
from tests.oracle import cell_from_parameters


def test_call_shapes_are_powers_of_two_within_the_budget():
    for slots in (32, 48, 64, 3 * 2**10, 2**14, 2**18):
        for k in (1, 5, 100, 1024):
            for devices in (1, 8):
                size, group = knn_calls.call_shape(slots, k, knn_calls.DEFAULT_CALL_BUDGET,
                                                   devices)
                assert size & (size - 1) == 0 and group & (group - 1) == 0
                assert size % (group * devices) == 0
                # A step holds about STEP_TRIPLES, a call the budget and CALL_OUTPUTS,
                # unless one block (or one step per device) is already more.
                assert group == 1 or group * QUERY_BLOCK * slots <= knn_calls.STEP_TRIPLES
                if size > group * devices:
                    assert size * QUERY_BLOCK * slots <= knn_calls.DEFAULT_CALL_BUDGET
                    assert size * QUERY_BLOCK * k <= knn_calls.CALL_OUTPUTS


def test_table_sizes_are_few_and_small_calls_stay_small():
    """Calls over one small structure keep small tables (their copy is most of the call);
    every bigger call shares the MIN_TABLE_ROWS floor, so chunks of varied files do not
    each compile their own kernels."""
    sizes = {n: knn_calls.table_rows(n) for n in range(1, 40_000, 7)}
    for n, rows in sizes.items():
        assert rows >= n + QUERY_BLOCK and rows & (rows - 1) == 0
    small = {rows for rows in sizes.values() if rows <= knn_calls.SMALL_TABLE_ROWS}
    assert knn_calls.table_rows(1) == 64 and len(small) == 5  # 64 ... 1,024
    big = {rows for n, rows in sizes.items() if n + QUERY_BLOCK > knn_calls.SMALL_TABLE_ROWS}
    assert big == {knn_calls.MIN_TABLE_ROWS, 2 * knn_calls.MIN_TABLE_ROWS}


def test_pack_puts_block_i_where_block_rows_reads_it():
    rng = np.random.default_rng(0)
    lattices = [cell_from_parameters(*rng.uniform(4, 9, 3), *rng.uniform(70, 110, 3))
                for _ in range(5)]
    fracs = [rng.random((int(rng.integers(1, 80)), 3)) for _ in lattices]
    p = knn_plan.plan(lattices, fracs, 5)
    rows = knn_calls.table_rows(len(p.order))
    assert rows >= len(p.order) + QUERY_BLOCK and rows & (rows - 1) == 0
    table = knn_calls.device_table(p, rows, None)
    blocks = np.arange(len(p.block_structure))[::-1]  # any order
    devices, size = 4, 4 * -(-len(blocks) // 4) + 4  # padding blocks too
    batch = knn_calls.pack(p, blocks, size, 64, 1, 5, table, devices)
    assert batch.query_atoms.shape == (devices, size // devices, QUERY_BLOCK)
    assert batch.num_blocks.sum() == len(blocks) and np.ptp(batch.num_blocks) <= 1
    block_rows, keep, slots = knn_calls._block_rows(p, blocks, size, devices)
    flat = np.asarray(batch.query_atoms).reshape(size, QUERY_BLOCK)[slots]
    offset = np.asarray(batch.offset).reshape(size)[slots]
    np.testing.assert_array_equal((offset[:, None] + flat)[keep], block_rows[keep])
    np.testing.assert_array_equal(np.asarray(batch.num_queries).reshape(size)[slots],
                                  keep.sum(axis=1))
    np.testing.assert_array_equal(np.asarray(table)[: len(p.order)],
                                  p.sorted_frac.astype(np.float32))
