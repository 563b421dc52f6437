"""The choices behind the default model, each against its alternatives, over seeds.

Every variant is the run flags (any flag of `python -m cryknn.main`: the shared budget,
e.g. --max_per_element and --epochs) with a few fields replaced; each runs once per seed
through `train.train_and_evaluate` (one workdir per run under --workroot, so an interrupted
ablation resumes). Choices are made on the *validation* split (mean balanced accuracy over
seeds); the test split is only reported.

Variants (--variants picks a subset, default all):
  inputs:     mlp at k = 5, 10, 20, 30 (more of the atom's own distances; its width and
              depth from the run flags) against the graph model at k = 5 with 1, 2 and 3
              hops (the neighbours' distances), width 64
  size:       graph width 32 / 64 / 128
  data:       graph with at most 5,000 / 10,000 / 20,000 training atoms per element
  weighting:  graph with class weighting none / sqrt_inverse_frequency / inverse_frequency

    python experiments/ablation.py [--name=core_mof] [--variants=mlp_k5,graph_h2]
        [--seeds=0,1,2] [--workroot=/tmp/cryknn_experiments/ablation]
        [any flag of python -m cryknn.main: --max_per_element, --epochs, --dataset, ...]

Writes <workroot>/<name>/<variant>_s<seed>/ (the usual workdirs), <workroot>/<name>/
ablation.json and ablation.md (the table).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GRAPH = dict(model="tree", k=5, hops=2, width=64)  # the graph model of 0.2 (A1)
VARIANTS: dict[str, dict] = {
    "mlp_k5": dict(model="mlp", k=5),
    "mlp_k10": dict(model="mlp", k=10),
    "mlp_k20": dict(model="mlp", k=20),
    "mlp_k30": dict(model="mlp", k=30),
    "graph_h1": dict(GRAPH, hops=1),
    "graph_h2": GRAPH,
    "graph_h3": dict(GRAPH, hops=3),
    "graph_h2_w32": dict(GRAPH, width=32),
    "graph_h2_w128": dict(GRAPH, width=128),
    "graph_h2_cap5k": dict(GRAPH, max_per_element=5000),
    "graph_h2_cap20k": dict(GRAPH, max_per_element=20000),
    "graph_h2_weight_none": dict(GRAPH, class_weighting="none"),
    "graph_h2_weight_inverse": dict(GRAPH, class_weighting="inverse_frequency"),
}
METRICS = ("accuracy", "balanced_accuracy", "top3_accuracy")


def run_row(variant: str, seed: int, metrics: dict) -> dict:
    """One table row from a run's metrics.json."""
    return {"variant": variant, "seed": seed,
            **{f"validation_{m}": metrics["validation"][m] for m in METRICS},
            **{f"test_{m}": metrics["test"][m] for m in METRICS},
            "train_s": metrics["timing"]["train_s"], "num_params": metrics["num_params"],
            "flags": metrics["flags"]}


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per variant, in VARIANTS order."""
    out = []
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
        runs = [r for r in rows if r["variant"] == variant]
        summary = {"variant": variant, "seeds": len(runs)}
        for key in ("validation_balanced_accuracy", "test_balanced_accuracy",
                    "test_accuracy", "train_s"):
            summary[f"{key}_mean"], summary[f"{key}_std"] = common.mean_std(
                [r[key] for r in runs])
        summary["num_params"] = runs[0]["num_params"]
        out.append(summary)
    return out


TABLE = (("variant", "variant"), ("seeds", "seeds"),
         ("validation_balanced_accuracy_mean", "val. balanced acc."),
         ("validation_balanced_accuracy_std", "+-"),
         ("test_balanced_accuracy_mean", "test balanced acc."),
         ("test_balanced_accuracy_std", "+-"), ("test_accuracy_mean", "test acc."),
         ("train_s_mean", "train s"), ("num_params", "params"))


def table_markdown(summary: Sequence[dict]) -> str:
    rows = [dict(r, train_s_mean=f"{r['train_s_mean']:.0f}") for r in summary]
    return common.markdown_table(rows, [c for c, _ in TABLE], [h for _, h in TABLE])


def best_variant(summary: Sequence[dict], prefix: str = "") -> dict:
    """The variant (among those whose name starts with prefix) with the best mean
    validation balanced accuracy."""
    candidates = [r for r in summary if r["variant"].startswith(prefix)]
    return max(candidates, key=lambda r: r["validation_balanced_accuracy_mean"])


def define_flags() -> None:
    from absl import flags

    common.define_run_flags()
    flags.DEFINE_string("variants", ",".join(VARIANTS), "Variants to run, comma-separated.")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "ablation"), "Workdirs go here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import errors, input_pipeline, train

    FLAGS = flags.FLAGS
    variants = [v for v in FLAGS.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise errors.ConfigError(f"unknown variants {sorted(unknown)}; choose from "
                                 f"{', '.join(VARIANTS)}")
    root = Path(FLAGS.workroot) / FLAGS.name
    # Featurise once at the largest k: the cache serves every smaller k.
    largest = max(VARIANTS[v].get("k", FLAGS.k) for v in variants)
    input_pipeline.prepare(common.run_config(k=largest), log=print)
    rows = []
    for variant in variants:
        for seed in common.parse_ints(FLAGS.seeds):
            workdir = root / f"{variant}_s{seed}"
            metrics = common.load_json(workdir / "metrics.json")
            if metrics is None:
                print(f"--- {variant} seed {seed}: {workdir}", flush=True)
                config = common.run_config(seed=seed, log_every=10**9, **VARIANTS[variant])
                metrics = train.train_and_evaluate(config, str(workdir))
            rows.append(run_row(variant, seed, metrics))
    summary = summarise(rows)
    md = table_markdown(summary)
    budget = dataclasses.asdict(common.run_config())
    common.write_json(root / "ablation.json", {"budget": budget, "runs": rows,
                                               "summary": summary})
    (root / "ablation.md").write_text(md + "\n")
    print(md)
    print(f"best on validation: {best_variant(summary)['variant']}; wrote {root}/ablation.md")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/ablation.py",
                     define_flags=define_flags)
