"""Graph model against the first-order mlp at equal training wall time.

    python experiments/equal_time.py --graph_workdirs=W0,W1,W2 [--mlp_k=20] [--seeds=0,1,2]
        [--workroot=/tmp/cryknn_experiments/equal_time] [any flag of python -m cryknn.main]

The graph runs are finished workdirs (e.g. the default run for three seeds). Their mean
training time (timing.train_s, evaluation excluded) is the budget. The mlp at --mlp_k (its
best k on validation, from experiments/ablation.py) first trains one epoch to measure its
epoch time, then trains from scratch for as many epochs as fit in the budget, once per
seed, with every other flag from the run flags. Both are reported on validation and test.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def summary(name: str, runs: Sequence[dict]) -> dict:
    row = {"model": name, "runs": len(runs)}
    for key, path in (("train_s", ("timing", "train_s")), ("epochs", ("flags", "epochs")),
                      ("val_bal", ("validation", "balanced_accuracy")),
                      ("test_bal", ("test", "balanced_accuracy")),
                      ("test_acc", ("test", "accuracy"))):
        row[f"{key}_mean"], row[f"{key}_std"] = common.mean_std(
            [r[path[0]][path[1]] for r in runs])
    return row


def define_flags() -> None:
    from absl import flags

    common.define_run_flags()
    flags.DEFINE_string("graph_workdirs", None, "Finished graph runs, comma-separated.")
    flags.DEFINE_integer("mlp_k", 20, "k of the mlp (its best k on validation).")
    flags.DEFINE_string("workroot", str(common.SCRATCH / "equal_time"), "Workdirs go here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import errors, train

    FLAGS = flags.FLAGS
    graph = [common.load_json(Path(w) / "metrics.json")
             for w in (FLAGS.graph_workdirs or "").split(",") if w]
    if not graph or any(m is None for m in graph):
        raise errors.ConfigError("--graph_workdirs must name finished runs (metrics.json)")
    budget = sum(m["timing"]["train_s"] for m in graph) / len(graph)
    root = Path(FLAGS.workroot) / FLAGS.name
    probe_config = common.run_config(model="mlp", k=FLAGS.mlp_k, epochs=1, log_every=10**9)
    probe = train.train_and_evaluate(probe_config, str(root / "probe"))
    epochs = max(1, round(budget / probe["timing"]["train_s"]))
    print(f"graph training time {budget:.0f} s; mlp k={FLAGS.mlp_k} epoch "
          f"{probe['timing']['train_s']:.1f} s: {epochs} epochs", flush=True)
    mlp = []
    for seed in common.parse_ints(FLAGS.seeds):
        config = dataclasses.replace(probe_config, epochs=epochs, seed=seed)
        workdir = root / f"mlp_k{FLAGS.mlp_k}_e{epochs}_s{seed}"
        mlp.append(common.load_json(workdir / "metrics.json")
                   or train.train_and_evaluate(config, str(workdir)))
    rows = [summary("graph (given runs)", graph), summary(f"mlp k={FLAGS.mlp_k}", mlp)]
    columns = [c for c in rows[0] if c not in ("model", "runs")]
    md = common.markdown_table(rows, ["model", "runs", *columns])
    common.write_json(root / "equal_time.json", {"budget_s": budget, "rows": rows})
    (root / "equal_time.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/equal_time.py",
                     define_flags=define_flags)
