"""One short accelerator check: featuriser throughput at k = 5, 20, 100 and training
throughput of the graph model and of the tree model it replaced.

  experiments/device_check.sh OUT.json            # on a GPU machine (makes CUDA jax first)
  python experiments/device_check.py --out=OUT.json --quick   # CPU smoke run (seconds)

Runs on whatever JAX backend is present and writes one JSON: the devices; per k the
featuriser's atoms/s (best warm run), compile seconds and max |error| against the
float64 oracle on a sample; vesin's CUDA path when vesin-torch and a CUDA torch are
installed (else the reason it was skipped); and the training throughput of cryknn's
own trainer on a toy feature cache (`tests/toy_data.py`), steps and loss
atoms per second after the first (compiling) epoch, for the graph model ('train') and
the tree model ('train_tree'), with their ratio ('train_speedup').

The lending GPU image has jax, flax, optax, orbax and numpy but no CIF reader (gemmi),
core-mof or pyxtal: structures then come from --corpus (an .npz written on a CPU
machine by --write_corpus) or, failing that, a synthetic corpus of random cells with
CoRE-MOF-like sizes and densities. Neither the featuriser nor the toy training path
imports the CIF reader.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------
# Corpus.


def synthetic_corpus(count: int, seed: int = 0) -> tuple[list, list]:
    """Random triclinic cells: atoms log-uniform in [20, 2000], 0.05-0.12 atoms/A^3."""
    rng = np.random.default_rng(seed)
    lattices, fracs = [], []
    while len(lattices) < count:
        n = int(np.exp(rng.uniform(np.log(20), np.log(2000))))
        volume = n / rng.uniform(0.05, 0.12)
        shape = np.eye(3) + rng.uniform(-0.3, 0.3, (3, 3))
        if abs(np.linalg.det(shape)) < 0.3:
            continue
        lattice = shape * (volume / abs(np.linalg.det(shape))) ** (1 / 3)
        lattices.append(lattice)
        fracs.append(rng.random((n, 3)))
    return lattices, fracs


def load_corpus(path: str | None, count: int, source: str) -> tuple[list, list, str]:
    """(lattices, fracs, description) from an .npz, the CoRE MOF reader, or synthetic."""
    if path:
        data = np.load(path)
        splits = np.cumsum(data["num_atoms"])[:-1]
        fracs = np.split(data["frac"], splits)
        return list(data["lattice"][:count]), fracs[:count], f"{path}"
    if source == "core_mof":
        try:
            from cryknn import cif

            items = list(itertools.islice((s for s in cif.iter_core_mof("2019-ASR")
                                           if isinstance(s, cif.Structure)), count))
            return [s.lattice for s in items], [s.frac for s in items], "core_mof 2019-ASR"
        except ImportError as e:
            print(f"core_mof unavailable ({e}); synthetic corpus", flush=True)
    lattices, fracs = synthetic_corpus(count)
    return lattices, fracs, "synthetic"


def write_corpus(path: str, count: int) -> None:
    """An .npz of the first `count` readable CoRE MOF cells, for machines without readers."""
    lattices, fracs, _ = load_corpus(None, count, "core_mof")
    np.savez_compressed(path, lattice=np.stack(lattices),
                        num_atoms=np.array([len(f) for f in fracs]),
                        frac=np.concatenate(fracs).astype(np.float32))
    print(f"wrote {path}: {len(lattices)} cells")


# ----------------------------------------------------------------------------
# Featuriser.


def bench_featurizer(lattices, fracs, k: int, rounds: int, oracle_sample: int) -> dict:
    """cryknn's atoms/s at k (best warm round), compile seconds, error vs the oracle."""
    from cryknn import neighbours
    from tests.oracle import brute_force_knn

    atoms = sum(len(f) for f in fracs)
    start = time.perf_counter()
    result = neighbours.featurize_arrays(lattices, fracs, k)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        neighbours.featurize_arrays(lattices, fracs, k)
        best = min(best, time.perf_counter() - start)
    small = sorted(range(len(fracs)), key=lambda i: len(fracs[i]))[:oracle_sample]
    err = 0.0
    for i in small:
        expected, _ = brute_force_knn(lattices[i], fracs[i], k)
        err = max(err, float(np.max(np.abs(result[i].distances - expected))))
    return {"atoms_per_s": atoms / best, "warm_s": best, "compile_s": first - best,
            "max_abs_err_vs_oracle": err, "oracle_structures": len(small)}


def bench_vesin_cuda(lattices, fracs, k: int) -> dict:
    """vesin's neighbour list on CUDA (vesin-torch), cutoff grown like the CPU benchmark."""
    try:
        import torch
        from vesin.torch import NeighborList
    except ImportError as e:
        return {"skipped": f"vesin-torch or torch not installed ({e})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA device"}
    from cryknn import knn_plan

    def one(lattice, frac):
        box = torch.tensor(lattice, device="cuda")
        points = torch.tensor((frac % 1.0) @ lattice, device="cuda")
        cutoff = float(knn_plan.initial_radius(lattice, len(frac), k))
        while True:
            nl = NeighborList(cutoff=cutoff, full_list=True)
            i, d = nl.compute(points=points, box=box, periodic=True, quantities="id")
            counts = torch.bincount(i, minlength=len(frac))
            if int(counts.min()) >= k:
                return d
            cutoff *= 1.5

    try:
        for lattice, frac in zip(lattices[:2], fracs[:2]):
            one(lattice, frac)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for lattice, frac in zip(lattices, fracs):
            one(lattice, frac)
        torch.cuda.synchronize()
    except Exception as e:  # an unsupported vesin build: report, do not fail the check
        return {"skipped": f"vesin CUDA path failed: {e!r}"[:300]}
    return {"atoms_per_s_neighbour_list_only": sum(map(len, fracs)) / (time.perf_counter() - start)}


# ----------------------------------------------------------------------------
# Training.


def bench_training(model: str, epochs: int, atoms_per_element: int, batch_size: int) -> dict:
    """Loss atoms/s of cryknn's trainer on a toy cache (`model`: 'graph' packs whole toy
    structures on the device, 'tree' gathers each atom's tree on the host); the first epoch
    (compiling) apart."""
    import jax

    from cryknn import config as config_lib
    from cryknn import input_pipeline
    from cryknn import train
    from tests import toy_data

    quiet = lambda message: None  # noqa: E731
    with tempfile.TemporaryDirectory() as data_dir:
        dataset, elements, k = "toy/device_check", (1, 6, 7, 8, 30), 5
        toy_data.write_toy_cache(data_dir, dataset, k, elements,
                                 (atoms_per_element, 200, 200))
        config = config_lib.Config(dataset=dataset, data_dir=data_dir, k=k, num_elements=5,
                                   model=model, epochs=epochs, batch_size=batch_size,
                                   log_every=10**6)
        data = input_pipeline.prepare(config, log=quiet)
        trainer = train.Trainer.create(config, data)
        start = time.perf_counter()
        trainer.fit(until_epoch=1, log=quiet)
        jax.block_until_ready(trainer.state)
        first, first_atoms = time.perf_counter() - start, trainer.trained_atoms
        start = time.perf_counter()
        trainer.fit(log=quiet)
        jax.block_until_ready(trainer.state)
        rest = time.perf_counter() - start
    steps = trainer.steps_per_epoch * (epochs - 1)
    return {"model": config.model, "batch_size": batch_size,
            "steps_per_epoch": trainer.steps_per_epoch, "first_epoch_s": first,
            "steps_timed": steps, "steps_per_s": steps / rest,
            "atoms_per_s": (trainer.trained_atoms - first_atoms) / rest}


# ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON to write")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes")
    parser.add_argument("--corpus", help=".npz of cells (see --write_corpus)")
    parser.add_argument("--source", default="core_mof", choices=["core_mof", "synthetic"])
    parser.add_argument("--structures", type=int, default=None,
                        help="cells to featurise (default 1000, --quick 20)")
    parser.add_argument("--k", default="5,20,100")
    parser.add_argument("--write_corpus", help="write an .npz of CoRE MOF cells and exit")
    args = parser.parse_args()
    if args.write_corpus:
        return write_corpus(args.write_corpus, args.structures or 1000)
    if not args.out:
        parser.error("--out is required")
    import jax

    count = args.structures or (20 if args.quick else 1000)
    report = {"jax": jax.__version__, "backend": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()], "quick": args.quick}
    lattices, fracs, source = load_corpus(args.corpus, count, args.source)
    report["corpus"] = {"source": source, "structures": len(fracs),
                        "atoms": int(sum(len(f) for f in fracs))}
    print(json.dumps({k: report[k] for k in ("backend", "devices", "corpus")}), flush=True)
    for k in [int(k) for k in args.k.split(",")]:
        row = bench_featurizer(lattices, fracs, k, rounds=1 if args.quick else 2,
                               oracle_sample=2 if args.quick else 5)
        row["vesin_cuda"] = bench_vesin_cuda(lattices, fracs, k)
        report[f"featurize_k{k}"] = row
        print(f"k={k}: {json.dumps(row)}", flush=True)
    # Loss atoms/s of the graph model and of the tree model it replaced, same toy data.
    for model, batch in (("graph", 1024 if args.quick else 4096), ("tree", 64 if args.quick
                                                                   else 512)):
        key = "train" if model == "graph" else "train_tree"
        report[key] = bench_training(model, epochs=2 if args.quick else 4,
                                     atoms_per_element=400 if args.quick else 10000,
                                     batch_size=batch)
        print(f"{key}: {json.dumps(report[key])}", flush=True)
    report["train_speedup"] = report["train"]["atoms_per_s"] / report["train_tree"]["atoms_per_s"]
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
