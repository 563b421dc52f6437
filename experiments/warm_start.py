"""Warm start to a larger k versus training from scratch.

For each seed: train a k-model (`train.train_and_evaluate`, same flags as the k sweep), then
for each k' in --k_new build two k'-runs on the very same prepared data:
  warm:    parameters from the k-model via `cryknn.warm_start.warm_start_run` (the new
           distances' input weights start at zero, so step 0 reproduces the k-model), once
           per --warm_lr_scales entry (peak learning rate = scratch's times the scale);
  scratch: the usual random initialisation.
Both train with the same optimiser, schedule shape, batches and number of steps, and the
validation balanced accuracy (the trainer's per-element-capped monitor estimate) is measured
every --eval_every steps. Reported per (k', seed): the step and training seconds (evaluation
time excluded) at which each run first reaches the scratch run's final validation balanced
accuracy, and both runs' final validation/test metrics (full splits).

    python experiments/warm_start.py [--name=core_mof] [--dataset=...] [--data_dir=DIR]
        [--k=5] [--k_new=6,10] [--seeds=0,1,2] [--max_per_element=4000] [--epochs=8]
        [--eval_every=25] [--warm_lr_scales=1,0.1] [--workroot=/tmp/cryknn_experiments/warm_start]

Writes <workroot>/<name>/results.json, <workroot>/<name>/results.md and
docs/figures/warm_start_<name>.png (validation balanced accuracy against steps and seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
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


def train_with_monitor(run, eval_every: int, log=print) -> list[dict]:
    """Train `run` (a train.Run) to its last step with the same steps, batches and dropout
    seed as Run.fit (which only estimates validation metrics once per epoch), estimating the
    validation metrics every eval_every steps (and at step 0). Returns the curve: dicts with step,
    seconds (training only, evaluation excluded), loss, accuracy, balanced_accuracy."""
    import jax
    import jax.numpy as jnp

    from cryknn import input_pipeline, train

    config, prepared, par = run.config, run.prepared, run.par
    step_fn = par.jit_train_step()
    weights = par.replicate(jnp.asarray(prepared.class_weights))
    seed = par.replicate(np.int32(config.seed + 1))  # dropout randomness, as in Run.fit

    def point(step, seconds):
        m = train.monitor_metrics(run.probs(prepared.monitor.x), prepared)
        return {"step": step, "seconds": seconds, **m}

    curve = [point(0, 0.0)]
    seconds, step = 0.0, 0
    for epoch in range(config.epochs):
        t = time.perf_counter()
        for local in input_pipeline.epoch_batches(prepared.train.x, prepared.train.y,
                                                  run.local_batch, seed=config.seed,
                                                  epoch=epoch):
            if step >= (epoch + 1) * run.steps_per_epoch:
                break
            run.state, _ = step_fn(run.state, par.global_batch(local), weights, seed)
            step += 1
            if step % eval_every == 0 or step == run.total_steps:
                jax.block_until_ready(run.state)
                seconds += time.perf_counter() - t
                curve.append(point(step, seconds))
                t = time.perf_counter()
        jax.block_until_ready(run.state)
        seconds += time.perf_counter() - t
    log(f"  {step} steps in {seconds:.1f} s: validation balanced accuracy "
        f"{curve[0]['balanced_accuracy']:.4f} -> {curve[-1]['balanced_accuracy']:.4f}")
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_run_arguments(p)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--k_new", default="6,10")
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--warm_lr_scales", default="1,0.1",
                   help="warm runs: peak learning rate = the scratch run's times each of these")
    p.add_argument("--workroot", default=str(common.SCRATCH / "warm_start"))
    p.add_argument("--out_dir", default=str(common.FIGURES))
    args = p.parse_args(argv)

    from cryknn import train, warm_start

    k_news = [int(x) for x in args.k_new.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    lr_scales = [float(x) for x in args.warm_lr_scales.split(",") if x.strip()]
    root = Path(args.workroot) / args.name
    quiet = lambda msg: None  # noqa: E731

    def config(k, seed):
        return train.Config(dataset=args.dataset, data_dir=args.data_dir, k=k, seed=seed,
                            num_elements=args.num_elements, elements=args.elements,
                            max_per_element=args.max_per_element, epochs=args.epochs,
                            model=args.model, log_every=10**9)

    results = []
    for seed in seeds:
        base_dir = root / f"base_k{args.k}_s{seed}"
        base_metrics = common.load_json(base_dir / "metrics.json")
        if base_metrics is None:
            print(f"--- base k={args.k} seed={seed}: {base_dir}", flush=True)
            base_metrics = train.train_and_evaluate(config(args.k, seed), str(base_dir))
        trained = train.load_trained(str(base_dir))
        for k_new in k_news:
            cfg = config(k_new, seed)
            prepared = train.prepare_data(cfg, log=quiet)
            keep = ("accuracy", "balanced_accuracy", "top3_accuracy")
            print(f"--- k={args.k} -> {k_new}, seed {seed}: scratch", flush=True)
            scratch_run = train.Run.create(cfg, prepared)
            scratch_curve = train_with_monitor(scratch_run, args.eval_every)
            scratch_test = scratch_run.evaluate("test")[0]
            for scale in lr_scales:
                print(f"--- k={args.k} -> {k_new}, seed {seed}: warm start, learning rate x"
                      f"{scale:g}", flush=True)
                warm_cfg = dataclasses.replace(cfg, learning_rate=cfg.learning_rate * scale)
                warm_run = train.Run.create(warm_cfg, prepared)
                warm_start.warm_start_run(warm_run, trained)
                warm_curve = train_with_monitor(warm_run, args.eval_every)
                warm_test = warm_run.evaluate("test")[0]
                results.append({
                    "k": args.k, "k_new": k_new, "seed": seed, "warm_lr_scale": scale,
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
                common.write_json(root / "results.json", {"flags": vars(args), "runs": results})

    md = summary_markdown(summary(results)) + "\n\nPer seed:\n\n" + table_markdown(results)
    (root / "results.md").write_text(md + "\n")
    fig = Path(args.out_dir) / f"warm_start_{args.name}.png"
    plot(results, f"{args.name}: {args.model}, <= {args.max_per_element} training atoms per "
                  f"element, {args.epochs} epochs for each run", fig)
    print(md)
    print(f"wrote {root}/results.json, {root}/results.md, {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
