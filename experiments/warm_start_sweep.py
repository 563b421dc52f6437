"""Warm start to a larger k versus training from scratch.

For each seed: train a k-model (`train.train_and_evaluate`, same flags as the k sweep), then
for each k' in --k_new build two k'-runs on the very same prepared data:
  warm:    parameters from the k-model via `cryknn.warm_start.warm_start_trainer` (the new
           distances' input weights start at zero, so step 0 reproduces the k-model), once
           per --warm_lr_scales entry (peak learning rate = scratch's times the scale);
  scratch: the usual random initialisation.
Both train with the same optimiser, schedule shape, batches and number of steps
(`Trainer.fit`), and a fit hook measures the validation balanced accuracy (the trainer's
per-element-capped monitor estimate) every --eval_every steps. Reported per (k', seed): the step and training seconds (evaluation
time excluded) at which each run first reaches the scratch run's final validation balanced
accuracy, and both runs' final validation/test metrics (full splits).

    python experiments/warm_start_sweep.py [--name=core_mof] [--k=5] [--k_new=6,10] [--seeds=0,1,2]
        [--eval_every=25] [--warm_lr_scales=1,0.1] [--workroot=/tmp/cryknn_experiments/warm_start]
        [any flag of python -m cryknn.main: --dataset, --data_dir, --epochs, ...]

Writes <workroot>/<name>/results.json, <workroot>/<name>/results.md and
docs/figures/warm_start_<name>.png (validation balanced accuracy against steps and seconds).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def first_reach(curve: Sequence[dict], target: float, key: str = "balanced_accuracy"
                ) -> dict | None:
    """The first point of curve (dicts with step, seconds, key) whose key >= target."""
    for point in curve:
        if point[key] >= target - 1e-12:
            return point
    return None


def train_with_monitor(trainer, eval_every: int, log=print) -> list[dict]:
    """Train `trainer` (a train.Trainer) to its last step, estimating the validation metrics
    at step 0 and every eval_every steps. Returns the curve: dicts with step, seconds
    (training only: the trainer's clock stops while the hook evaluates), loss, accuracy,
    balanced_accuracy."""
    from cryknn import train

    def point(t):
        return {"step": int(t.state.step), "seconds": t.train_seconds, **t.monitor()}

    def at_the_end(t):
        if int(t.state.step) == t.total_steps and curve[-1]["step"] < t.total_steps:
            curve.append(point(t))

    curve = [point(trainer)]
    trainer.fit([train.Hook(lambda t: curve.append(point(t)), every_steps=eval_every),
                 train.Hook(at_the_end, at_epoch_end=True)], log=lambda message: None)
    log(f"  {curve[-1]['step']} steps in {trainer.train_seconds:.1f} s: validation balanced "
        f"accuracy {curve[0]['balanced_accuracy']:.4f} -> {curve[-1]['balanced_accuracy']:.4f}")
    return curve


def compare(warm: list[dict], scratch: list[dict]) -> dict:
    """Steps/seconds for each curve to reach the scratch run's final balanced accuracy."""
    target = scratch[-1]["balanced_accuracy"]
    w, s = first_reach(warm, target), first_reach(scratch, target)
    out = {"target_balanced_accuracy": target,
           "warm_steps": w and w["step"], "warm_seconds": w and w["seconds"],
           "scratch_steps": s and s["step"], "scratch_seconds": s and s["seconds"],
           "warm_start_balanced_accuracy": warm[0]["balanced_accuracy"],
           "warm_final_balanced_accuracy": warm[-1]["balanced_accuracy"],
           "scratch_final_balanced_accuracy": target}
    if w and s and w["step"] > 0:
        out["step_ratio"] = s["step"] / w["step"]
    return out


WARM_COLORS = ("C0", "C2", "C3", "C4")


def summary(results: list[dict]) -> list[dict]:
    """Means over seeds per (k_new, warm learning-rate scale)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["k_new"], r.get("warm_lr_scale", 1.0)), []).append(r)
    rows = []
    for (k_new, scale), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        cs = [r["comparison"] for r in runs]

        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        rows.append({
            "k": f"{runs[0]['k']} -> {k_new}", "lr": f"x{scale:g}", "seeds": len(runs),
            "reached": f"{sum(c['warm_steps'] is not None for c in cs)}/{len(cs)}",
            "warm_steps": mean([c["warm_steps"] for c in cs]),
            "scratch_steps": mean([c["scratch_steps"] for c in cs]),
            "warm_s": mean([c["warm_seconds"] for c in cs]),
            "scratch_s": mean([c["scratch_seconds"] for c in cs]),
            "base_test_bal": mean([r["base_test"]["balanced_accuracy"] for r in runs]),
            "warm_test_bal": mean([r["warm_test"]["balanced_accuracy"] for r in runs]),
            "scratch_test_bal": mean([r["scratch_test"]["balanced_accuracy"] for r in runs]),
            "warm_test_acc": mean([r["warm_test"]["accuracy"] for r in runs]),
            "scratch_test_acc": mean([r["scratch_test"]["accuracy"] for r in runs]),
        })
    return rows


def summary_markdown(rows: list[dict]) -> str:
    cols = ["k", "lr", "seeds", "reached", "warm_steps", "scratch_steps", "warm_s", "scratch_s",
            "base_test_bal", "warm_test_bal", "scratch_test_bal", "warm_test_acc",
            "scratch_test_acc"]
    heads = ["k", "warm lr", "seeds", "warm reached target", "warm steps", "scratch steps",
             "warm s", "scratch s", "k-model test bal.", "warm test bal.", "scratch test bal.",
             "warm test acc.", "scratch test acc."]
    return common.markdown_table(rows, cols, heads, digits=3)


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k_news = sorted({r["k_new"] for r in results})
    fig, axes = plt.subplots(len(k_news), 2, figsize=(13, 4.2 * len(k_news)), squeeze=False)
    for row, k_new in enumerate(k_news):
        scales = sorted({r.get("warm_lr_scale", 1.0) for r in results}, reverse=True)
        drawn = set()
        for r in (r for r in results if r["k_new"] == k_new):
            scale = r.get("warm_lr_scale", 1.0)
            color = WARM_COLORS[scales.index(scale) % len(WARM_COLORS)]
            curves = [(r["warm_curve"], color, f"warm, lr x{scale:g}")]
            if r["seed"] not in drawn:  # one scratch curve per seed
                drawn.add(r["seed"])
                curves.append((r["scratch_curve"], "C1", "scratch"))
                axes[row, 0].axhline(r["base_validation_balanced_accuracy"], color="grey",
                                     ls=":", lw=1)
            for curve, color, label in curves:
                for col, x in enumerate(("step", "seconds")):
                    axes[row, col].plot([p[x] for p in curve],
                                        [p["balanced_accuracy"] for p in curve], "-",
                                        color=color, alpha=0.7, lw=1, label=label)
        for col, x in enumerate(("optimiser steps", "training seconds (evaluation excluded)")):
            ax = axes[row, col]
            ax.set_xlabel(x)
            ax.set_ylabel("validation balanced accuracy (monitor estimate)")
            ax.set_title(f"k = {results[0]['k']} -> {k_new}: warm start vs scratch, one line per "
                         f"seed" + ("; dotted: the k-models" if col == 0 else ""), fontsize=10)
            lo = min(p["balanced_accuracy"] for r in results if r["k_new"] == k_new
                     for p in r["warm_curve"])
            ax.set_ylim(max(0.0, lo - 0.15), None)
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            seen = {}
            for h, lab in zip(handles, labels):
                seen.setdefault(lab, h)
            ax.legend(seen.values(), seen.keys(), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table_markdown(results: list[dict]) -> str:
    rows = []
    for r in results:
        c = r["comparison"]
        rows.append({
            "k": f"{r['k']} -> {r['k_new']}", "seed": r["seed"],
            "lr": f"x{r.get('warm_lr_scale', 1.0):g}",
            "target": c["target_balanced_accuracy"],
            "start": c["warm_start_balanced_accuracy"],
            "warm_steps": c["warm_steps"], "scratch_steps": c["scratch_steps"],
            "warm_s": c["warm_seconds"], "scratch_s": c["scratch_seconds"],
            "warm_test_bal": r["warm_test"]["balanced_accuracy"],
            "scratch_test_bal": r["scratch_test"]["balanced_accuracy"],
            "warm_test_acc": r["warm_test"]["accuracy"],
            "scratch_test_acc": r["scratch_test"]["accuracy"],
        })
    return common.markdown_table(
        rows, ["k", "seed", "lr", "target", "start", "warm_steps", "scratch_steps", "warm_s",
               "scratch_s", "warm_test_bal", "scratch_test_bal", "warm_test_acc",
               "scratch_test_acc"],
        ["k", "seed", "warm lr", "target val. bal. acc.", "warm at step 0", "warm steps",
         "scratch steps", "warm s", "scratch s", "warm test bal.", "scratch test bal.", "warm test acc.",
         "scratch test acc."], digits=3)


def define_flags() -> None:
    from absl import flags

    common.define_run_flags()
    flags.DEFINE_string("k_new", "6,10", "Larger values of k to warm-start, comma-separated.")
    flags.DEFINE_integer("eval_every", 25, "Steps between validation estimates.")
    flags.DEFINE_string("warm_lr_scales", "1,0.1", "Warm runs: peak learning rate = the "
                        "scratch run's times each of these.")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "warm_start"), "Workdirs go here.")
    flags.DEFINE_string("out_dir", str(common.FIGURES), "Figures go here.")


def compare_seed(seed: int, k_news: Sequence[int], lr_scales: Sequence[float], root: Path,
                 eval_every: int) -> list[dict]:
    """Base k-model, then per k' a scratch run and one warm run per learning-rate scale."""
    from cryknn import checkpoints, input_pipeline, train, warm_start

    base_config = common.run_config(seed=seed, log_every=10**9)
    base_dir = root / f"base_k{base_config.k}_s{seed}"
    base_metrics = common.load_json(base_dir / "metrics.json")
    if base_metrics is None:
        print(f"--- base k={base_config.k} seed={seed}: {base_dir}", flush=True)
        base_metrics = train.train_and_evaluate(base_config, str(base_dir))
    trained = checkpoints.load_trained(str(base_dir))
    keep = ("accuracy", "balanced_accuracy", "top3_accuracy")
    results = []
    for k_new in k_news:
        cfg = dataclasses.replace(base_config, k=k_new)
        data = input_pipeline.prepare(cfg, log=lambda message: None)
        print(f"--- k={base_config.k} -> {k_new}, seed {seed}: scratch", flush=True)
        scratch = train.Trainer.create(cfg, data)
        scratch_curve = train_with_monitor(scratch, eval_every)
        scratch_test = scratch.evaluate("test")[0]
        for scale in lr_scales:
            print(f"--- k={base_config.k} -> {k_new}, seed {seed}: warm start, learning rate "
                  f"x{scale:g}", flush=True)
            warm_cfg = dataclasses.replace(cfg, learning_rate=cfg.learning_rate * scale)
            warm = train.Trainer.create(warm_cfg, data)
            warm_start.warm_start_trainer(warm, trained)
            warm_curve = train_with_monitor(warm, eval_every)
            warm_test = warm.evaluate("test")[0]
            results.append({
                "k": base_config.k, "k_new": k_new, "seed": seed, "warm_lr_scale": scale,
                "learning_rate": cfg.learning_rate,
                "base_validation_balanced_accuracy":
                    base_metrics["history"][-1]["validation_balanced_accuracy"],
                "base_test": {m: base_metrics["test"][m] for m in keep},
                "warm_curve": warm_curve, "scratch_curve": scratch_curve,
                "warm_test": {m: warm_test[m] for m in keep},
                "scratch_test": {m: scratch_test[m] for m in keep},
                "comparison": compare(warm_curve, scratch_curve),
            })
            c = results[-1]["comparison"]
            print(f"    target {c['target_balanced_accuracy']:.4f}: warm reaches it at "
                  f"step {c['warm_steps']} ({common.fmt(c['warm_seconds'], 1)} s), scratch "
                  f"at step {c['scratch_steps']} ({common.fmt(c['scratch_seconds'], 1)} s); "
                  f"test balanced accuracy warm {warm_test['balanced_accuracy']:.4f} vs "
                  f"scratch {scratch_test['balanced_accuracy']:.4f}", flush=True)
    return results


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    root = Path(FLAGS.workroot) / FLAGS.name
    config = common.run_config()
    results = []
    for seed in common.parse_ints(FLAGS.seeds):
        results += compare_seed(seed, common.parse_ints(FLAGS.k_new),
                                common.parse_floats(FLAGS.warm_lr_scales), root,
                                FLAGS.eval_every)
        common.write_json(root / "results.json",
                          {"flags": dataclasses.asdict(config), "runs": results})
    md = summary_markdown(summary(results)) + "\n\nPer seed:\n\n" + table_markdown(results)
    (root / "results.md").write_text(md + "\n")
    fig = Path(FLAGS.out_dir) / f"warm_start_{FLAGS.name}.png"
    plot(results, f"{FLAGS.name}: {config.model}, <= {config.max_per_element} training atoms "
                  f"per element, {config.epochs} epochs for each run", fig)
    print(md)
    print(f"wrote {root}/results.json, {root}/results.md, {fig}")
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/warm_start_sweep.py",
                     define_flags=define_flags)
