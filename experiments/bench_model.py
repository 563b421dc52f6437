"""Training throughput of the graph model against the tree model, side by side.

Both models train on the same CoRE MOF structures with the same code path as
`cryknn.main` (`train.train_step` jit-compiled, batches from `input_pipeline`'s batchers),
and every timed step includes building its batch on the host: for the tree model that is
the numpy gather of each atom's unrolled neighbourhood, for the graph model the packing
of whole structures (crops of big ones). atoms/s counts atoms that carry a loss, as
training logs it; context atoms that only pass messages do not count.

  python experiments/bench_model.py --json=docs/runs/bench_model.json

Measured: the tree model (k = 5, 2 hops, width 64, batch 512 atoms) and the graph model at
the same k, hops and width (without directions; with directions at the default and at
the other angular width tried on validation; every atom of the chosen elements carries a
loss; also with the per-element cap as the tree model
trains: crops of each loss atom's receptive field); then the graph model's cost per atom
against k (5, 10, 20 at 2 hops) and hops (1..4 at k = 5), without directions.
Configurations run in interleaved rounds; each keeps its best round (the machine is shared
and noisy). Each configuration's first steps (compilation) are not timed; XLA's count of
floating-point operations per loss atom is printed beside (machine independent).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from absl import app, flags
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_structures", 300, "CoRE MOF structures (archive order) to train on.")
flags.DEFINE_integer("steps", 12, "Timed steps per configuration and round.")
flags.DEFINE_integer("rounds", 2, "Interleaved timed rounds (best kept).")
flags.DEFINE_integer("graph_batch", 4096, "Graph model: node slots per batch.")
flags.DEFINE_integer("tree_batch", 512, "Tree model: atoms per batch.")
flags.DEFINE_float("cap_fraction", 0.1, "Graph model 'capped': fraction of atoms carrying a "
                   "loss (the default run's per-element cap keeps ~10 %).")
flags.DEFINE_list("cases", None, "Only these configurations (names as printed; default "
                  "all). The JSON needs tree, graph and graph_capped.")
flags.DEFINE_string("json", None, "Write the results here.")


@dataclasses.dataclass
class Case:
    name: str
    model: str
    k: int
    hops: int
    fraction: float = 1.0
    directions: bool = False
    angular_channels: int | None = None  # None: the graph model's default
    best_atoms_per_s: float = 0.0
    compile_s: float = 0.0
    flops_per_atom: float = 0.0
    runner: object = None
    compiled: object = None  # the compiled training step (experiments/profile_model.py)


def make_runner(table, labels_all, case: Case, num_classes: int):
    """A function timing `FLAGS.steps` training steps (batch building included); returns
    loss atoms trained."""
    import jax

    from cryknn import config as config_lib
    from cryknn import input_pipeline, models, train

    config = config_lib.Config(dataset="bench", k=case.k, model=case.model, hops=case.hops,
                               batch_size=FLAGS.graph_batch if case.model == "graph"
                               else FLAGS.tree_batch, width=64,
                               directions=case.directions if case.model == "graph" else None,
                               angular_channels=case.angular_channels)
    table = table.first_k(case.k)
    rng = np.random.default_rng(0)
    rows = np.flatnonzero(labels_all >= 0)
    if case.fraction < 1:
        rows = np.sort(rng.choice(rows, int(len(rows) * case.fraction), replace=False))
    atoms = input_pipeline.LabelledAtoms(table, rows, labels_all[rows])
    stats = models.input_statistics_of(config, table.distances[rows])
    model = models.create_model(config, num_classes, stats)
    state = train.create_train_state(model, config, 10_000)
    spec = config_lib.input_spec(config)
    batches = input_pipeline.batches_for(spec, config.batch_size, 1, 1)
    step = jax.jit(train.train_step, donate_argnums=0)
    weights = jax.numpy.ones(num_classes)
    seed = jax.numpy.int32(0)
    holder = {"state": state, "epoch": 0}

    def stream():
        while True:
            yield from batches.epoch(atoms, seed=0, epoch=holder["epoch"])
            holder["epoch"] += 1

    source = stream()
    first = next(source)
    compiled = case.compiled = step.lower(holder["state"], first, weights, seed).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    # Machine-independent: XLA's count of floating-point operations per loss atom.
    case.flops_per_atom = float(analysis.get("flops", 0.0)) / max(float(first["mask"].sum()), 1)

    def run(steps: int) -> int:
        done = 0
        for _ in range(steps):
            batch = next(source)
            holder["state"], metrics = step(holder["state"], batch, weights, seed)
            done += batch["mask"].sum()
        jax.block_until_ready(holder["state"])
        return int(done)

    return run


def load_table(num_structures: int, k: int):
    from cryknn import features

    structures, _ = common.read_structures("core_mof", num_structures)
    return features.atom_table(structures, k)


def cases() -> list[Case]:
    from cryknn import config as config_lib

    # The graph model's default angular channels, and the other width tried on validation.
    other = 16 if config_lib.MODEL_DEFAULTS["graph"]["angular_channels"] == 8 else 8
    out = [Case("tree", "tree", 5, 2), Case("graph", "graph", 5, 2),
           Case("graph_directions", "graph", 5, 2, directions=True),
           Case(f"graph_directions_a{other}", "graph", 5, 2, directions=True,
                angular_channels=other),
           Case("graph_capped", "graph", 5, 2, FLAGS.cap_fraction)]
    out += [Case(f"graph_k{k}", "graph", k, 2) for k in (10, 20)]
    out += [Case(f"graph_h{h}", "graph", 5, h) for h in (1, 3, 4)]
    return out


def pack_fill(table, labels) -> dict:
    """Share of the graph packs' node slots that hold atoms (k = 5, 2 hops, the bench's
    pack size): first fit (what training does) and next fit (close a pack when the next
    unit does not fit; the packing before first fit), units in archive order."""
    from cryknn import config as config_lib
    from cryknn import graph_batch, input_pipeline

    config = config_lib.Config(dataset="bench", k=5, model="graph", hops=2,
                               batch_size=FLAGS.graph_batch)
    rows = np.flatnonzero(labels >= 0)
    atoms = input_pipeline.LabelledAtoms(table.first_k(5), rows, labels[rows])
    units = input_pipeline.batches_for(config_lib.input_spec(config), FLAGS.graph_batch,
                                       1, 1).units(atoms)
    sizes = [len(u.nodes) for u in units]
    next_fit, used = 1, 0
    for size in sizes:
        if used + size > FLAGS.graph_batch - 1:
            next_fit, used = next_fit + 1, 0
        used += size
    first_fit = len(graph_batch.pack_units(units, FLAGS.graph_batch - 1))
    return {name: sum(sizes) / (packs * FLAGS.graph_batch)
            for name, packs in (("first_fit", first_fit), ("next_fit", next_fit))}


def main(argv):
    del argv
    from cryknn import input_pipeline

    t0 = time.time()
    table = load_table(FLAGS.num_structures, 20)
    counts = input_pipeline.element_counts(table.atomic_number)
    elements = input_pipeline.choose_elements(counts, num_elements=min(
        20, int(np.count_nonzero(counts))))
    labels = input_pipeline.label_table(elements)[table.atomic_number]
    print(f"{len(table)} atoms of {len(table.structure_id)} structures, {len(elements)} "
          f"elements; featurised in {time.time() - t0:.0f} s", flush=True)
    fill = pack_fill(table, labels)
    print(f"graph pack slots holding atoms: first fit {fill['first_fit']:.1%}, next fit "
          f"{fill['next_fit']:.1%}", flush=True)
    todo = [c for c in cases() if not FLAGS.cases or c.name in FLAGS.cases]
    for case in todo:
        t = time.time()
        case.runner = make_runner(table, labels, case, len(elements))
        case.runner(2)  # compile and warm up
        case.compile_s = time.time() - t
    for r in range(FLAGS.rounds):
        for case in todo:
            t = time.perf_counter()
            atoms = case.runner(FLAGS.steps)
            rate = atoms / (time.perf_counter() - t)
            case.best_atoms_per_s = max(case.best_atoms_per_s, rate)
            print(f"round {r + 1} {case.name}: {rate:,.0f} loss atoms/s", flush=True)
    report(todo, time.time() - t0, len(table), fill)


def report(todo: list[Case], total_s: float, num_atoms: int, fill: dict) -> None:
    by = {c.name: c for c in todo}
    for c in todo:
        print(f"{c.name}: {c.best_atoms_per_s:,.0f} loss atoms/s, "
              f"{c.flops_per_atom / 1e6:.2f} MFLOP per loss atom")
    if not {"tree", "graph", "graph_capped"} <= set(by):
        return
    base = by["graph"].best_atoms_per_s
    cost = [{"k": c.k, "hops": c.hops, "atoms_per_s": c.best_atoms_per_s,
             "us_per_atom": 1e6 / c.best_atoms_per_s, "relative_cost": base / c.best_atoms_per_s,
             "mflop_per_atom": c.flops_per_atom / 1e6}
            for c in todo if c.model == "graph" and c.fraction == 1 and not c.directions]
    cost.sort(key=lambda c: (c["k"], c["hops"]))
    result = {
        "tree_atoms_per_s": by["tree"].best_atoms_per_s,
        "graph_atoms_per_s": base,
        "graph_capped_atoms_per_s": by["graph_capped"].best_atoms_per_s,
        "graph_directions_atoms_per_s": (by["graph_directions"].best_atoms_per_s
                                         if "graph_directions" in by else None),
        "directions_speedup": {c.name: c.best_atoms_per_s / by["tree"].best_atoms_per_s
                               for c in todo if c.directions},
        "speedup": base / by["tree"].best_atoms_per_s,
        "speedup_capped": by["graph_capped"].best_atoms_per_s / by["tree"].best_atoms_per_s,
        "cost": cost,
        "pack_fill": fill,
        "compile_s": {c.name: c.compile_s for c in todo},
        "mflop_per_loss_atom": {c.name: c.flops_per_atom / 1e6 for c in todo},
        "settings": {"num_structures": FLAGS.num_structures, "atoms": num_atoms,
                     "steps": FLAGS.steps, "rounds": FLAGS.rounds,
                     "graph_batch": FLAGS.graph_batch, "tree_batch": FLAGS.tree_batch,
                     "cap_fraction": FLAGS.cap_fraction, "width": 64},
        "total_s": total_s,
    }
    print(f"tree {result['tree_atoms_per_s']:,.0f} atoms/s; graph {base:,.0f} "
          f"({result['speedup']:.1f}x); graph with the cap (crops) "
          f"{result['graph_capped_atoms_per_s']:,.0f} ({result['speedup_capped']:.1f}x)")
    if result["graph_directions_atoms_per_s"]:  # the graph model's default
        print(f"graph with directions (its default) "
              f"{result['graph_directions_atoms_per_s']:,.0f} "
              f"({result['directions_speedup']['graph_directions']:.2f}x the tree)")
    print("MFLOP per loss atom (XLA's count): " + ", ".join(
        f"{c.name} {c.flops_per_atom / 1e6:.2f}" for c in todo))
    print(common.markdown_table(cost, ["k", "hops", "atoms_per_s", "us_per_atom",
                                       "relative_cost", "mflop_per_atom"]))
    if FLAGS.json:
        common.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main)
