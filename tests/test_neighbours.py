"""cryknn.neighbours against a brute-force float64 oracle, amd, and itself; the featurize CLI."""

import json
import sys
import textwrap

import numpy as np
import pytest

from cryknn import errors
from cryknn import geometry
from cryknn import knn_kernel
from cryknn import knn_plan
from cryknn import neighbours
from cryknn import cif
from tests.conftest import (NACL_CIF, REPO, SHARED_COD, error_lines, finish, make_cif,
                            run_module, start_module, subprocess_env)
from tests import side_lane
from tests.oracle import brute_force_knn, cell_from_parameters

TOLERANCE = 1e-4  # angstrom, float32 on device vs float64 oracle
NORM_TOLERANCE = 1e-5  # angstrom, |vector| vs distance: both float32 from one candidate


def random_cell(rng, lengths=(2.0, 12.0), angles=(20.0, 160.0), min_shape=0.05):
    """A random triclinic cell; min_shape bounds volume / (a b c) away from 0."""
    while True:
        params = [*rng.uniform(*lengths, 3), *rng.uniform(*angles, 3)]
        try:
            lattice = cell_from_parameters(*params)
        except ValueError:
            continue
        if abs(np.linalg.det(lattice)) > min_shape * np.prod(params[:3]):
            return lattice


def assert_matches_oracle(lattice, frac, k, queries=None, result=None):
    """featurize_arrays of one cell (or its `result` from a call of many) against the
    float64 oracle: distances, indices, vectors."""
    if result is None:
        (result,) = neighbours.featurize_arrays([lattice], [frac], k)
    expected, expected_index, expected_vectors = brute_force_knn(lattice, frac, k, queries,
                                                                 vectors=True)
    got = result.distances if queries is None else result.distances[queries]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert np.all(np.diff(result.distances, axis=1) >= 0)
    assert_neighbours_are_real(lattice, frac, result, queries)
    rows = np.arange(len(frac)) if queries is None else np.asarray(queries)
    assert_vectors_consistent(lattice, frac, result, rows)
    assert_same_neighbours(got, result.indices[rows], result.vectors[rows],
                           expected, expected_index, expected_vectors)
    return result


def assert_vectors_consistent(lattice, frac, result, rows):
    """Each vector is the neighbour's image minus the atom: its norm is the distance, the
    neighbour's fractional position plus an integer image reproduces it, and a row's
    neighbours are distinct points (never the atom itself)."""
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == result.distances.shape + (3,)
    lattice, frac = np.asarray(lattice, np.float64), np.asarray(frac, np.float64)
    d = result.distances[rows].astype(np.float64)
    j = result.indices[rows]
    v = result.vectors[rows].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), d, atol=NORM_TOLERANCE, rtol=1e-6)
    delta = frac[j] - frac[rows][:, None]  # (R, k, 3)
    image = np.round(v @ np.linalg.inv(lattice) - delta)
    np.testing.assert_allclose((delta + image) @ lattice, v, atol=TOLERANCE, rtol=0)
    assert not np.any((j == rows[:, None]) & np.all(image == 0, axis=-1))
    points = np.concatenate([j[..., None], image.astype(np.int64)], axis=-1)
    for row in points:
        assert len(np.unique(row, axis=0)) == len(row)


def assert_same_neighbours(d, j, v, d_ref, j_ref, v_ref):
    """Row by row the same (neighbour index, vector) pairs as the reference, except that
    where the k-th distance is tied either side may hold other points of that tie."""
    d, d_ref = np.asarray(d, np.float64), np.asarray(d_ref, np.float64)
    same = (j[:, :, None] == j_ref[:, None, :]) & (
        np.linalg.norm(v[:, :, None].astype(np.float64) - v_ref[:, None, :], axis=-1)
        < TOLERANCE)
    assert np.all(same.any(axis=2) | (np.abs(d - d_ref[:, -1:]) < TOLERANCE))
    assert np.all(same.any(axis=1) | (np.abs(d_ref - d_ref[:, -1:]) < TOLERANCE))


def assert_neighbours_are_real(lattice, frac, result, queries=None):
    """Each (distance, index) pair is the distance to some image of that atom."""
    lattice = np.asarray(lattice, np.float64)
    cart = (np.asarray(frac, np.float64) % 1.0) @ lattice
    rows = range(len(frac)) if queries is None else queries
    spacing = geometry.interplanar_spacings(lattice)
    for i in rows:  # every neighbour of a row at once, over the images its k-th may need
        d, j = result.distances[i].astype(np.float64), result.indices[i]
        reach = np.ceil(d.max() / spacing).astype(int) + 1
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach],
                                    indexing="ij"), -1).reshape(-1, 3)
        images = cart[j][:, None] + (grid @ lattice)[None] - cart[i]  # (k, G, 3)
        gap = np.abs(np.linalg.norm(images, axis=-1) - d[:, None]).min(axis=1)
        assert np.all(gap < TOLERANCE), gap.max()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 5, 20])
def test_skewed_triclinic_cells(seed, k):
    rng = np.random.default_rng(seed)
    lattice = random_cell(rng)
    frac = rng.random((int(rng.integers(1, 30)), 3))
    assert_matches_oracle(lattice, frac, k)


@pytest.mark.parametrize("seed", range(4))
def test_long_thin_cells(seed):
    rng = np.random.default_rng(100 + seed)
    a = rng.uniform(1.5, 3.0)
    lattice = cell_from_parameters(a, a * rng.uniform(0.8, 1.2), a * rng.uniform(20, 40),
                                   *rng.uniform(60, 120, 3))
    if seed % 2:  # the long axis first
        lattice = lattice[[2, 0, 1]]
    frac = rng.random((int(rng.integers(1, 8)), 3))
    assert_matches_oracle(lattice, frac, k=12)


@pytest.mark.parametrize("k", [1, 6, 100])
def test_one_atom_cells(k):
    rng = np.random.default_rng(k)
    for _ in range(3):
        assert_matches_oracle(random_cell(rng, lengths=(0.8, 6.0)), rng.random((1, 3)), k)


def test_k_far_above_atoms_per_cell():
    rng = np.random.default_rng(7)
    lattice = cell_from_parameters(3.1, 4.0, 5.2, 70, 100, 110)
    result = assert_matches_oracle(lattice, rng.random((2, 3)), k=100)
    assert result.distances.shape == (2, 100)


def test_isolated_atom_forces_a_retry_and_stays_exact():
    # A dense cluster and one atom far from it: the density radius holds k
    # neighbours for the cluster but not for the lone atom, so its structure is
    # retried with a larger radius.
    rng = np.random.default_rng(21)
    lattice = cell_from_parameters(18.0, 19.0, 20.0, 85, 95, 100)
    frac = np.concatenate([0.1 + 0.12 * rng.random((40, 3)), [[0.6, 0.55, 0.6]]])
    k = 10
    result = assert_matches_oracle(lattice, frac, k)
    assert result.radius > knn_plan.initial_radius(lattice, len(frac), k)
    assert result.distances[-1, -1] <= result.radius


def test_simple_cubic_shells():
    (result,) = neighbours.featurize_arrays([np.eye(3) * 2.0], [np.zeros((1, 3))], 26)
    expected = np.array([2.0] * 6 + [2.0 * np.sqrt(2)] * 12 + [2.0 * np.sqrt(3)] * 8)
    np.testing.assert_allclose(result.distances[0], expected, atol=TOLERANCE)
    assert set(result.indices[0]) == {0}
    # The 26 vectors are the 26 lattice points around the origin, each once, by shell.
    steps = np.round(result.vectors[0] / 2.0)
    np.testing.assert_allclose(result.vectors[0], 2.0 * steps, atol=TOLERANCE)
    assert len({tuple(s) for s in steps}) == 26 and not np.any(np.all(steps == 0, axis=1))
    np.testing.assert_array_equal(np.abs(steps).sum(axis=1), [1] * 6 + [2] * 12 + [3] * 8)


def test_self_excluded_once_and_overlapping_sites_kept():
    lattice = np.diag([5.0, 6.0, 7.0])
    frac = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.6, 0.6, 0.6]])
    result = assert_matches_oracle(lattice, frac, k=3)
    assert result.distances[0, 0] == 0.0 and result.indices[0, 0] == 1
    assert result.distances[1, 0] == 0.0 and result.indices[1, 0] == 0
    assert result.distances[2, 0] > 0.0
    np.testing.assert_array_equal(result.vectors[:2, 0], 0.0)


def test_coordinates_outside_unit_cell_are_wrapped():
    rng = np.random.default_rng(3)
    lattice = random_cell(rng)
    frac = rng.random((5, 3))
    shifted = frac + rng.integers(-3, 4, frac.shape)
    a, b = neighbours.featurize_arrays([lattice, lattice], [frac, shifted], 8)
    np.testing.assert_allclose(a.distances, b.distances, atol=TOLERANCE)
    assert_same_neighbours(a.distances, a.indices, a.vectors, b.distances, b.indices, b.vectors)


def test_large_cell_high_k_bounded_memory():
    # A 2,000-atom cell at k = 100 runs in chunks; spot-check rows vs the oracle.
    rng = np.random.default_rng(11)
    lattice = cell_from_parameters(28.0, 30.0, 26.0, 80, 95, 105)
    frac = rng.random((2000, 3))
    assert_matches_oracle(lattice, frac, k=100, queries=[0, 777, 1999])


def _rows_multiset(distances):
    rows = np.round(np.asarray(distances, np.float64), 3)
    return sorted(map(tuple, rows))


def test_invariance_supercell_permutation_and_reduced_basis():
    rng = np.random.default_rng(5)
    lattice = random_cell(rng, angles=(60, 120))
    frac = rng.random((6, 3))
    k = 10
    supercell = np.diag([2, 1, 1]) @ lattice
    super_frac = np.concatenate([frac * [0.5, 1, 1], frac * [0.5, 1, 1] + [0.5, 0, 0]])
    permutation = rng.permutation(len(frac))
    # Same lattice, another basis: b' = b + a, c' = c - 2a (unimodular change).
    change = np.array([[1, 0, 0], [1, 1, 0], [-2, 0, 1]])
    other_lattice = change @ lattice
    other_frac = frac @ lattice @ np.linalg.inv(other_lattice)
    base, sup, perm, other = neighbours.featurize_arrays(
        [lattice, supercell, lattice, other_lattice],
        [frac, super_frac, frac[permutation], other_frac], k)
    rows = _rows_multiset(base.distances)
    assert _rows_multiset(sup.distances) == sorted(rows + rows)
    assert _rows_multiset(perm.distances) == rows
    assert _rows_multiset(other.distances) == rows


def test_vectors_rotate_with_the_lattice():
    # Rows of the lattice rotated (or reflected): the same neighbours, vectors rotated.
    # The kernel works in a rotated frame of its own; vectors come back in the caller's.
    rng = np.random.default_rng(8)
    for _ in range(3):
        lattice, frac = random_cell(rng), rng.random((int(rng.integers(1, 12)), 3))
        rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        a, b = neighbours.featurize_arrays([lattice, lattice @ rotation], [frac, frac], 10)
        np.testing.assert_allclose(a.distances, b.distances, atol=TOLERANCE)
        assert_same_neighbours(b.distances, b.indices, b.vectors, a.distances, a.indices,
                               a.vectors.astype(np.float64) @ rotation)


def test_vectors_of_a_random_batch_match_oracle():
    # Tiny, skewed and long-thin cells of assorted sizes in one call (several blocks,
    # candidate buckets and a retry), each checked against the oracle.
    rng = np.random.default_rng(31)
    lattices = [random_cell(rng, lengths=(0.8, 4.0)) for _ in range(3)]
    lattices += [random_cell(rng) for _ in range(6)]
    lattices += [cell_from_parameters(2.0, 2.2, 60.0, 80, 95, 110)[[2, 0, 1]],
                 cell_from_parameters(1.8, 45.0, 2.1, 70, 100, 85)]
    fracs = [rng.random((int(rng.integers(1, 45)), 3)) for _ in lattices]
    k = 16
    results = neighbours.featurize_arrays(lattices, fracs, k)
    for lattice, frac, result in zip(lattices, fracs, results):
        expected, index, vectors = brute_force_knn(lattice, frac, k, vectors=True)
        np.testing.assert_allclose(result.distances, expected, atol=TOLERANCE, rtol=0)
        rows = np.arange(len(frac))
        assert_vectors_consistent(lattice, frac, result, rows)
        assert_same_neighbours(result.distances, result.indices, result.vectors,
                               expected, index, vectors)


def test_bad_input_raises_clear_errors():
    with pytest.raises(errors.FeaturizeError, match="k must be"):
        neighbours.featurize_arrays([np.eye(3)], [np.zeros((1, 3))], 0)
    with pytest.raises(errors.FeaturizeError, match="degenerate"):
        neighbours.featurize_arrays([np.diag([1.0, 1.0, 0.0])], [np.zeros((1, 3))], 3)
    with pytest.raises(errors.FeaturizeError, match="NaN"):
        neighbours.featurize_arrays([np.eye(3)], [np.full((1, 3), np.nan)], 3)


# ----------------------------------------------------------------------------
# Real structures.


def core_mof_sample(count, max_atoms=None):
    out = []
    for item in cif.iter_core_mof("2019-ASR"):
        if isinstance(item, cif.Structure):
            if max_atoms is None or item.num_atoms <= max_atoms:
                out.append(item)
        if len(out) == count:
            return out
    return out


def assert_all_match_oracle(structures, k):
    """Structures featurised in one call (as the tools do), each against the oracle."""
    found = neighbours.featurize(structures, k)
    for s, result in zip(structures, found, strict=True):
        assert_matches_oracle(s.lattice, s.frac, k, result=result)


@pytest.mark.parametrize("k", [5, 20])
def test_real_core_mof_structures_match_oracle(k):
    assert_all_match_oracle(core_mof_sample(6, max_atoms=150), k)


def test_real_molecular_crystals_match_oracle():
    crystals = [s for s in cif.read_pyxtal_db() if s.num_atoms <= 120][:8]
    assert crystals
    assert_all_match_oracle(crystals, 10)


@pytest.mark.skipif(not SHARED_COD.is_dir(), reason="../shared/data/cod not present")
def test_real_cod_structures_match_oracle():
    read = []
    for item in cif.iter_structures([SHARED_COD]):
        if isinstance(item, cif.Structure) and 1 < item.num_atoms <= 150:
            read.append(item)
        if len(read) == 10:
            break
    assert_all_match_oracle(read, 8)


def test_matches_amd_on_real_structures():
    pytest.importorskip("amd")
    # The routine amd's PDD uses; amd exports no public per-point k-NN.
    from amd._nearest_neighbors import nearest_neighbors
    sample = core_mof_sample(12) + cif.read_pyxtal_db()[:12]
    k = 12
    results = neighbours.featurize(sample, k)
    for s, result in zip(sample, results):
        cart = s.frac % 1.0 @ s.lattice
        # amd counts the query point itself as its own first neighbour.
        expected = nearest_neighbors(cart, s.lattice, cart, k + 1)[:, 1:]
        np.testing.assert_allclose(result.distances, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_assorted_real_structures_compile_a_handful_of_times():
    sample = core_mof_sample(200)
    sizes = {s.num_atoms for s in sample}
    assert len(sizes) > 50  # assorted sizes
    knn_kernel.knn_kernel.clear_cache()
    neighbours.featurize(sample, 5)
    compiles = knn_kernel.knn_kernel._cache_size()
    # One per (candidate bucket, call size) in use; candidate buckets are half-octave
    # steps, so however many distinct atom counts (more than 50 here) only a few.
    assert compiles <= 12, compiles


_SHARDED_KNN = textwrap.dedent("""
    import numpy as np
    import jax
    from cryknn import neighbours
    from tests.oracle import cell_from_parameters
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    lattices = [cell_from_parameters(*rng.uniform(4, 9, 3), *rng.uniform(70, 110, 3))
                for _ in range(11)]
    fracs = [rng.random((int(rng.integers(1, 40)), 3)) for _ in lattices]
    sharded = neighbours.featurize_arrays(lattices, fracs, 7,
                                          sharding=neighbours.data_parallel_sharding())
    single = neighbours.featurize_arrays(lattices, fracs, 7)
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-6)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    print("OK")
""")


def _sharded_knn_job(folder):
    return side_lane.Job([sys.executable, "-c", _SHARDED_KNN],
                         subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), REPO)


@pytest.mark.side_lane(job=_sharded_knn_job)
def test_sharded_path_matches_single_device(side_job):
    proc = side_job.result
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


def _device_check_job(folder):
    return side_lane.Job([str(REPO / "experiments" / "device_check.sh"),
                          str(folder / "check.json"), "--cpu", "--quick", "--k=3",
                          "--source=synthetic", "--structures=4"],
                         subprocess_env(PYTHON=sys.executable), REPO)


@pytest.mark.slow
@pytest.mark.side_lane(job=_device_check_job)
def test_device_check_script_runs_on_cpu(side_job):
    """experiments/device_check.sh in its CPU smoke mode writes the report it promises."""
    proc = side_job.result
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((side_job.folder / "check.json").read_text())
    assert report["backend"] == "cpu" and report["corpus"]["source"] == "synthetic"
    assert report["corpus"]["structures"] == 4
    row = report["featurize_k3"]
    assert row["atoms_per_s"] > 0 and row["max_abs_err_vs_oracle"] < TOLERANCE
    assert "skipped" in row["vesin_cuda"] or row["vesin_cuda"]["atoms_per_s_neighbour_list_only"] > 0
    assert report["train"]["steps_timed"] > 0 and report["train"]["steps_per_s"] > 0


# ----------------------------------------------------------------------------
# CLI.

def run_cli(*args):
    return run_module("cryknn.featurize", *args)


def test_cli_writes_rows_and_reports_skips(tmp_path):
    folder = tmp_path / "cifs" / "nested"
    folder.mkdir(parents=True)
    (folder / "nacl.cif").write_text(NACL_CIF)
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 'unterminated\n")
    out = tmp_path / "f.npz"
    proc = run_cli("--k=6", f"--out={out}", str(tmp_path / "cifs"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 skipped" in proc.stdout and "broken.cif" in proc.stdout
    data = np.load(out, allow_pickle=False)
    assert data["distances"].shape == (8, 6) and data["distances"].dtype == np.float32
    # neighbour_index: rows of this file; every first neighbour of Na is Cl and vice versa
    index = data["neighbour_index"]
    assert index.shape == (8, 6) and index.min() >= 0 and index.max() < 8
    numbers = data["atomic_number"]
    assert np.all(numbers[index] != numbers[:, None])
    np.testing.assert_allclose(data["distances"], 2.82, atol=1e-4)  # a / 2, six times
    # neighbour_vector: the six neighbours at +-a/2 along the axes, |vector| == distance
    vectors = data["neighbour_vector"]
    assert vectors.shape == (8, 6, 3) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), data["distances"], atol=1e-5)
    np.testing.assert_allclose(np.sort(vectors.sum(axis=-1), axis=1),
                               np.tile([-2.82] * 3 + [2.82] * 3, (8, 1)), atol=1e-4)
    assert set(data["structure_id"]) == {"nacl:nacl"}
    assert sorted(set(data["atomic_number"])) == [11, 17]
    assert len(data["site_label"]) == 8


@pytest.mark.parametrize("args", [["--k=0", "--out=x.npz", "."], ["--k=3", "."],
                                  ["--k=3", "--out=x.npz", "/no/such/dir"],
                                  ["--k=3", "--out=/no/such/dir/x.npz", "."],
                                  ["--k=3", "--out=features", "."], ["--out=x.npz"],
                                  ["--k=three", "--out=x.npz", "."], ["--nosuchflag", "."],
                                  ["--disorder=sometimes", "--out=x.npz", "."]])
def test_cli_bad_arguments_exit_2_with_one_line(args):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_cli_out_must_not_be_a_directory(tmp_path):
    (tmp_path / "x.npz").mkdir()
    proc = run_cli("--k=3", f"--out={tmp_path / 'x.npz'}", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_exits_0_and_shows_positional_paths(flag):
    proc = run_cli(flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m cryknn.featurize") and "PATH" in proc.stdout
    assert "--disorder" in proc.stdout and "--k" in proc.stdout


def test_cli_reader_policy_flags(tmp_path):
    """--nomerge_duplicates keeps two same-element sites 0.3 A apart in a P1 file."""
    cif = tmp_path / "pair.cif"
    cif.write_text(make_cif([("C1", "C", 0.10, 0.1, 0.1), ("C2", "C", 0.13, 0.1, 0.1),
                             ("O1", "O", 0.50, 0.5, 0.5)], cell="10 10 10 90 90 90",
                            block="pair"))
    flags = ("--merge_duplicates", "--nomerge_duplicates")
    children = {merge: start_module("cryknn.featurize", "--k=2", f"--out={tmp_path / merge}.npz",
                                    merge, str(cif)) for merge in flags}  # side by side
    counts = {}
    for merge, child in children.items():
        proc = finish(child)
        assert proc.returncode == 0, proc.stderr
        counts[merge] = len(np.load(f"{tmp_path / merge}.npz")["distances"])
    assert counts == {"--merge_duplicates": 2, "--nomerge_duplicates": 3}
