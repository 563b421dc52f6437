"""Accuracy versus k: train the same model on the same data with the same budget for every k.

For each k in --ks and each seed in --seeds this calls `train.train_and_evaluate` (one
workdir per run under --workroot, so an interrupted sweep resumes: finished runs are read
back from their metrics.json) and collects test accuracy, balanced accuracy and top-3
accuracy, validation balanced accuracy, parameter count and training time. The seed changes
the initialisation, the batch order and which training atoms the per-element cap keeps.

The features are computed once at the largest k (and cached beside the dataset); every
smaller k reads the first k columns, so all runs see the same atoms.

Best k: the smallest k whose mean *validation* balanced accuracy (over seeds) is within one
standard deviation (over seeds) of the best mean (`common.best_k_one_sd`); the test split is
only reported, never used to choose.

    python experiments/k_sweep.py [--name=core_mof] [--ks=1,2,3,4,5,6,7,8,9,10,12,16,20]
        [--seeds=0,1,2] [--workroot=/tmp/cryknn_experiments/k_sweep] [--plot_only]
        [any flag of python -m cryknn.main: --dataset, --data_dir, --model, --epochs, ...]

Writes <workroot>/<name>/k<k>_s<seed>/ (the usual workdir: metrics.json,
misclassifications.csv, confusion_matrix.png, ...), <workroot>/<name>/sweep.json (all runs
and the best-k decision), <workroot>/<name>/sweep.md (the table) and
docs/figures/k_sweep_<name>.png.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20)
METRICS = ("accuracy", "balanced_accuracy", "top3_accuracy")


def run_record(k: int, seed: int, metrics: dict) -> dict:
    """One sweep row from a run's metrics.json."""
    test, val, timing = metrics["test"], metrics["validation"], metrics.get("timing", {})
    history = metrics.get("history") or []
    return {
        "k": k, "seed": seed,
        **{f"test_{m}": test[m] for m in METRICS},
        **{f"validation_{m}": val[m] for m in METRICS},
        "num_params": metrics["num_params"],
        "train_s": timing.get("train_s"),
        "total_s": timing.get("total_s"),
        "steps": history[-1]["step"] if history else None,
        "majority_accuracy": metrics["majority_baseline"]["accuracy"],
        "majority_balanced_accuracy": metrics["majority_baseline"]["balanced_accuracy"],
        "elements": metrics.get("elements"),
        # The family-bootstrap interval and per-element recall of the test split.
        "test_balanced_accuracy_interval": test.get("intervals", {}).get("balanced_accuracy"),
        "test_recall": {e: v["recall"] for e, v in test.get("per_element", {}).items()},
    }


WEAK_ELEMENTS = ("Fe", "Co", "Ni", "Cl")


def per_seed_markdown(records: Sequence[dict], elements: Sequence[str] = WEAK_ELEMENTS) -> str:
    """Per k: validation and test balanced accuracy of each seed (seed order), the test
    split's 95 % family-bootstrap interval of each, and the mean test recall over seeds of
    `elements` (the elements the models confuse most)."""
    by_k: dict[int, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["k"], r["seed"])):
        by_k.setdefault(r["k"], []).append(r)
    head = ["k", "seeds", "val. balanced per seed", "test balanced per seed",
            "95 % intervals", " / ".join(elements) + " recall (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean_recall(runs: list[dict], element: str) -> str:
        values = [r["test_recall"][element] for r in runs
                  if element in r.get("test_recall", {})]
        return f"{np.mean(values):.2f}" if values else "-"

    for k, runs in by_k.items():
        val = " / ".join(f"{r['validation_balanced_accuracy']:.3f}" for r in runs)
        test = " / ".join(f"{r['test_balanced_accuracy']:.3f}" for r in runs)
        spans = " ".join(f"[{i[0]:.3f}, {i[1]:.3f}]" if i else "-" for i in
                         (r.get("test_balanced_accuracy_interval") for r in runs))
        recall = " / ".join(mean_recall(runs, e) for e in elements)
        lines.append(f"| {k} | {len(runs)} | {val} | {test} | {spans} | {recall} |")
    return "\n".join(lines)


def aggregate(records: Sequence[dict]) -> list[dict]:
    """Per-k mean and standard deviation (over seeds) of every numeric column."""
    by_k: dict[int, list[dict]] = {}
    for r in records:
        by_k.setdefault(r["k"], []).append(r)
    rows = []
    for k in sorted(by_k):
        runs = by_k[k]
        row = {"k": k, "seeds": len(runs)}
        for key in ("test_accuracy", "test_balanced_accuracy", "test_top3_accuracy",
                    "validation_balanced_accuracy", "num_params", "train_s", "total_s"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = common.mean_std(values)
        rows.append(row)
    return rows


def choose_k(records: Sequence[dict], key: str = "validation_balanced_accuracy") -> dict:
    per_k: dict[int, list[float]] = {}
    for r in records:
        per_k.setdefault(r["k"], []).append(r[key])
    decision = common.best_k_one_sd(per_k)
    decision["criterion"] = (f"smallest k whose mean {key.replace('_', ' ')} over seeds is "
                             f"within one standard deviation (over seeds) of the best mean")
    return decision


def plot(rows: Sequence[dict], records: Sequence[dict], decision: dict, title: str,
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.array([r["k"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for i, (m, label) in enumerate((("test_accuracy", "accuracy"),
                                    ("test_balanced_accuracy", "balanced accuracy"),
                                    ("test_top3_accuracy", "top-3 accuracy"))):
        mean = np.array([r[f"{m}_mean"] for r in rows])
        std = np.array([r[f"{m}_std"] for r in rows])
        ax.errorbar(ks, mean, yerr=std, fmt="o-", color=f"C{i}", capsize=3, label=label)
        ax.fill_between(ks, mean - std, mean + std, color=f"C{i}", alpha=0.15)
        ax.plot([r["k"] for r in records], [r[m] for r in records], ".", color=f"C{i}",
                alpha=0.5, ms=4)
    maj = np.mean([r["majority_accuracy"] for r in records])
    ax.axhline(maj, color="grey", ls=":", label=f"majority-class accuracy ({maj:.2f})")
    ax.axvline(decision["chosen_k"], color="k", ls="--", lw=1,
               label=f"chosen k = {decision['chosen_k']}")
    ax.set_xlabel("k (nearest-neighbour distances per atom)")
    ax.set_ylabel("test split")
    ax.set_title("test metrics: mean +- std over seeds (dots: single runs)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(ks, [r["num_params_mean"] for r in rows], "o-", color="C3")
    ax.set_xlabel("k")
    ax.set_ylabel("parameters", color="C3")
    ax2 = ax.twinx()
    t = np.array([r["train_s_mean"] for r in rows])
    ts = np.array([r["train_s_std"] for r in rows])
    ax2.errorbar(ks, t, yerr=ts, fmt="s--", color="C4", capsize=3)
    ax2.set_ylabel("training time per run (s)", color="C4")
    ax.set_title("cost: parameters and training seconds (same steps for every k)", fontsize=10)
    ax.grid(alpha=0.3)

    ax = axes[2]
    mean = np.array([r["validation_balanced_accuracy_mean"] for r in rows])
    std = np.array([r["validation_balanced_accuracy_std"] for r in rows])
    ax.errorbar(ks, mean, yerr=std, fmt="o-", color="C1", capsize=3,
                label="validation balanced accuracy")
    ax.axhline(decision["threshold"], color="k", ls=":", lw=1,
               label=f"best mean - 1 std ({decision['threshold']:.3f})")
    ax.axvline(decision["chosen_k"], color="k", ls="--", lw=1,
               label=f"chosen k = {decision['chosen_k']}")
    ax.set_xlabel("k")
    ax.set_title("best-k criterion (validation split)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


TABLE = (("k", "k"), ("seeds", "seeds"),
         ("test_accuracy_mean", "accuracy"), ("test_accuracy_std", "+-"),
         ("test_balanced_accuracy_mean", "balanced acc."), ("test_balanced_accuracy_std", "+-"),
         ("test_top3_accuracy_mean", "top-3"), ("test_top3_accuracy_std", "+-"),
         ("validation_balanced_accuracy_mean", "val. balanced"),
         ("validation_balanced_accuracy_std", "+-"),
         ("num_params_mean", "params"), ("train_s_mean", "train s"), ("total_s_mean", "run s"))


def table_markdown(rows: Sequence[dict]) -> str:
    out = []
    for r in rows:
        r = dict(r)
        r["num_params_mean"] = int(r["num_params_mean"])
        for key in ("train_s_mean", "total_s_mean"):
            r[key] = f"{r[key]:.0f}"
        out.append(r)
    return common.markdown_table(out, [c for c, _ in TABLE], [h for _, h in TABLE])


def define_flags() -> None:
    from absl import flags

    common.define_run_flags()
    flags.DEFINE_string("ks", ",".join(map(str, DEFAULT_KS)), "Values of k, comma-separated.")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "k_sweep"), "Workdirs go here.")
    flags.DEFINE_string("out_dir", str(common.FIGURES), "Figures go here.")
    flags.DEFINE_bool("plot_only", False, "Only collect finished runs.")


def run_sweep(ks: Sequence[int], seeds: Sequence[int], root: Path, plot_only: bool,
              log=print) -> list[dict]:
    """Train (or read back) one run per (k, seed); returns their sweep rows."""
    records = []
    if not plot_only:
        # Featurise once at the largest k: the cache serves every smaller k (first columns).
        from cryknn import input_pipeline

        input_pipeline.prepare(common.run_config(k=max(ks)), log=log)
    for k in ks:
        for seed in seeds:
            workdir = root / f"k{k}_s{seed}"
            metrics = common.load_json(workdir / "metrics.json")
            if metrics is None and not plot_only:
                from cryknn import train

                log(f"--- k={k} seed={seed}: {workdir}")
                config = common.run_config(k=k, seed=seed, log_every=10**9)
                metrics = train.train_and_evaluate(config, str(workdir))
            if metrics is not None:
                records.append(run_record(k, seed, metrics))
    return records


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    ks, seeds = common.parse_ints(FLAGS.ks), common.parse_ints(FLAGS.seeds)
    root = Path(FLAGS.workroot) / FLAGS.name
    root.mkdir(parents=True, exist_ok=True)
    t_sweep = time.time()
    records = run_sweep(ks, seeds, root, FLAGS.plot_only)
    if not records:
        print("no finished runs", file=sys.stderr)
        return 1
    rows = aggregate(records)
    decision = choose_k(records)
    config = common.run_config()
    common.write_json(root / "sweep.json", {
        "flags": dataclasses.asdict(config), "runs": records, "per_k": rows,
        "decision": decision, "seconds_this_invocation": time.time() - t_sweep,
        "runs_total_seconds": sum(r["total_s"] or 0 for r in records)})
    md = table_markdown(rows) + "\n\n" + per_seed_markdown(records)
    (root / "sweep.md").write_text(md + "\n")
    title = (f"{FLAGS.name}: {config.model}, {len(records[0]['elements'] or [])} elements, "
             f"<= {config.max_per_element} training atoms per element, {config.epochs} epochs "
             f"(same steps for every k), {len(seeds)} seeds")
    fig = Path(FLAGS.out_dir) / f"k_sweep_{FLAGS.name}.png"
    plot(rows, records, decision, title, fig)
    print(md)
    print(f"best mean validation balanced accuracy at k={decision['best_k']} "
          f"({decision['best_mean']:.4f} +- {decision['best_std']:.4f}); chosen k = "
          f"{decision['chosen_k']} ({decision['criterion']})")
    print(f"wrote {root}/sweep.json, {root}/sweep.md, {fig}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/k_sweep.py",
                     define_flags=define_flags)
