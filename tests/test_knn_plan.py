"""cryknn.knn_plan on its own (numpy only): the windows and image boxes hold every point within
the radius (checked by brute force), blocks cover the asked atoms once, buckets."""

import itertools

import numpy as np
import pytest

from cryknn import errors
from cryknn import geometry
from cryknn import knn_plan
from tests.oracle import cell_from_parameters


def random_cells(seed, count):
    """(lattices, fracs): skewed triclinic, long thin and flat cells of 1 .. 39 atoms."""
    rng = np.random.default_rng(seed)
    lattices, fracs = [], []
    while len(lattices) < count:
        shape = len(lattices) % 3
        lengths = ([*rng.uniform(2, 12, 3)], [*rng.uniform(1.5, 3, 2), rng.uniform(20, 40)],
                   [rng.uniform(15, 30), *rng.uniform(2, 4, 2)])[shape]
        try:
            lattice = cell_from_parameters(*lengths, *rng.uniform(30, 150, 3))
        except ValueError:
            continue
        if abs(np.linalg.det(lattice)) < 0.05 * np.prod(lengths):
            continue
        lattices.append(lattice)
        fracs.append(rng.random((int(rng.integers(1, 40)), 3)) * 2 - 0.5)  # wrapped by plan
    return lattices, fracs


def points_within(lattice, frac, radius):
    """For each atom i, (atoms j (P,), translations t (P, 3)) of every point within radius of
    it but itself, from a box of translations larger than needed."""
    reach = np.ceil(radius / geometry.interplanar_spacings(lattice)).astype(int) + 2
    shifts = np.array(list(itertools.product(*(range(-r, r + 1) for r in reach))))
    images = (frac[None] + shifts[:, None]) @ lattice  # (T, N, 3)
    origin = np.flatnonzero(np.all(shifts == 0, axis=1))
    for i, point in enumerate(frac @ lattice):
        d = np.linalg.norm(images - point, axis=-1)  # (T, N)
        d[origin, i] = np.inf
        t, j = np.nonzero(d <= radius)
        yield j, shifts[t]


@pytest.mark.parametrize("k", [1, 8, 40])
def test_windows_and_image_boxes_hold_every_point_within_the_radius(k):
    lattices, fracs = random_cells(k, 9)
    # A large cell, whose blocks see only part of it (narrow windows).
    lattices.append(cell_from_parameters(14.0, 15.0, 40.0, 80, 95, 105))
    fracs.append(np.random.default_rng(k).random((300, 3)))
    p = knn_plan.plan(lattices, fracs, k)
    assert np.any(p.window_count < p.num_atoms[p.block_structure])
    # Each atom's block; every atom is a query (plan's default).
    block_of = np.empty(len(p.order), np.int64)
    for b, (s, atoms, q) in enumerate(zip(p.block_structure, p.block_atoms, p.block_queries)):
        block_of[p.offset[s] + atoms[:q]] = b
    for s, (lattice, frac) in enumerate(zip(lattices, fracs)):
        n, first = p.num_atoms[s], p.offset[s]
        sorted_of = np.argsort(p.order[first : first + n] - first)  # caller atom -> sorted
        frac = geometry.wrap(np.asarray(frac, np.float64))
        for i, (j, t) in enumerate(points_within(lattice, frac, p.radius[s])):
            b = block_of[first + sorted_of[i]]
            assert np.all((sorted_of[j] - p.window_start[b]) % n < p.window_count[b]), (s, i)
            # Each translation is among the S_a enumerated from t0 = ceil(-R_a - delta_a).
            t0 = np.ceil(-p.frac_radius[s] - (frac[j] - frac[i]))
            assert np.all((t0 <= t) & (t < t0 + p.image_counts[s])), (s, i)


def test_blocks_cover_the_asked_atoms_once():
    lattices, fracs = random_cells(3, 12)
    total = sum(len(f) for f in fracs)
    asked = np.random.default_rng(0).random(total) < 0.3
    p = knn_plan.plan(lattices, fracs, 6, queries=asked)
    assert np.all(p.block_queries <= knn_plan.QUERY_BLOCK) and np.all(p.block_queries >= 1)
    rows = [p.order[p.offset[s] + a] for s, atoms, q in
            zip(p.block_structure, p.block_atoms, p.block_queries) for a in atoms[:q]]
    assert sorted(rows) == np.flatnonzero(asked).tolist()
    assert np.all(p.window_count <= p.num_atoms[p.block_structure])


def test_first_radius_holds_k_plus_one_candidates_and_images_needed_agrees():
    lattices, fracs = random_cells(5, 12)
    for k in (1, 20, 100):
        p = knn_plan.plan(lattices, fracs, k)
        images = np.prod(p.image_counts, axis=1)
        assert np.all(images * p.num_atoms >= k + 1)
        assert np.all(p.radius >= knn_plan.initial_radius(p.lattice, p.num_atoms, k))
        np.testing.assert_array_equal(
            knn_plan.images_needed(p.lattice, p.num_atoms, k), images)


def test_candidate_buckets_are_the_next_half_octave():
    counts = np.arange(1, 5000)
    for k in (1, 5, 100):
        buckets = knn_plan.candidate_bucket(counts, k)
        needed = np.maximum(np.maximum(counts, k + 1), knn_plan.MIN_CANDIDATES)
        assert np.all(buckets >= needed)
        power = 2 ** np.floor(np.log2(buckets)).astype(np.int64)
        assert np.all((buckets == power) | (buckets == power * 3 // 2))
        # The next smaller half-octave would not hold the count.
        smaller = np.where(buckets == power, power * 3 // 4, power)
        assert np.all(smaller < needed)


def test_rare_buckets_merge_into_the_next_common_one():
    buckets = np.array([32] * 50 + [48] + [64] * 49 + [96] * 2 + [192])
    merged = knn_plan.merge_rare_buckets(buckets)
    np.testing.assert_array_equal(merged, [32] * 50 + [64] * 50 + [192] * 3)
    assert np.all(merged >= buckets)


def test_check_block_candidates_names_the_callers_structure():
    lattices, fracs = random_cells(7, 3)
    p = knn_plan.plan(lattices, fracs, 5, radii=np.array([1.0, 1.0, 400.0]))
    with pytest.raises(errors.FeaturizeError, match="structure 12: the search for k = 5"):
        knn_plan.check_block_candidates(p, np.array([10, 11, 12]), 5)
