"""Toy data: synthetic atom tables for tests and benchmarks that must run without a real
dataset. `write_toy_cache` puts them where `cryknn.features.load_features` finds a cache-only
dataset named `toy/<name>`, so the whole training path runs on them."""

from __future__ import annotations

import numpy as np

from cryknn import elements as elements_lib
from cryknn import features

# Typical first-neighbour distances (angstrom) per atomic number; the rest get 2.0 + Z/100.
_TOY_FIRST_DISTANCE = {1: 1.0, 6: 1.4, 7: 1.35, 8: 1.25, 29: 1.95, 30: 2.0}


def toy_features(atomic_numbers, atoms_per_element, k: int, *, seed: int = 0,
                 atoms_per_structure: int = 20, noise: float = 0.05) -> features.AtomTable:
    """An AtomTable with element-dependent k-NN distances (learnable, not physical).

    Atom j of element Z gets sorted distances d_i = f(Z) * (1 + 0.3 i) + noise, grouped into
    structures `toy<n>:toy<n>` of `atoms_per_structure` atoms with site labels like 'C3';
    neighbours are random atoms of the same structure, in random directions.
    """
    rng = np.random.default_rng(seed)
    zs = np.repeat(np.asarray(atomic_numbers, np.int32), atoms_per_element)
    rng.shuffle(zs)
    first = np.array([_TOY_FIRST_DISTANCE.get(int(z), 2.0 + z / 100) for z in zs])
    d = first[:, None] * (1 + 0.3 * np.arange(k))[None] + noise * rng.standard_normal((len(zs), k))
    d = np.sort(np.abs(d), axis=1).astype(np.float32)
    n_struct = -(-len(zs) // atoms_per_structure)
    index = (np.arange(len(zs)) // atoms_per_structure).astype(np.int32)
    first_row = index * atoms_per_structure
    size = np.minimum(atoms_per_structure, len(zs) - first_row)
    neighbours = first_row[:, None] + rng.integers(0, 1 << 30, (len(zs), k)) % size[:, None]
    labels = np.array([f"{elements_lib.symbol(z)}{i % atoms_per_structure + 1}"
                       for i, z in enumerate(zs)]).astype(np.bytes_)
    ids = np.array([f"toy{seed}_{i}:toy{seed}_{i}" for i in range(n_struct)])
    directions = rng.standard_normal((len(zs), k, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    return features.AtomTable(
        distances=d, neighbour_index=neighbours.astype(np.int32), atomic_number=zs,
        structure_index=index, site_label=labels, structure_id=ids,
        neighbour_vector=(directions * d[..., None]).astype(np.float32))


def write_toy_cache(data_dir: str, dataset: str, k: int, atomic_numbers,
                    atoms_per_element=(300, 60, 60), process_count: int = 1) -> None:
    """Feature caches of train/validation/test toy splits (dataset 'toy/<name>'), one per
    process, so a run needs no real dataset."""
    if not dataset.startswith(features.TOY_PREFIX):
        raise ValueError(f"toy dataset names start with {features.TOY_PREFIX!r}, "
                         f"got {dataset!r}")
    for p in range(process_count):
        for i, (split, n) in enumerate(zip(features.SPLITS, atoms_per_element)):
            path = features.cache_path(data_dir, dataset, features.TOY_FINGERPRINT, k, split,
                                       p, process_count)
            toy_features(atomic_numbers, n, k, seed=10 * p + i).save(path)