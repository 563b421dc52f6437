"""Where a model's training step spends its time on this machine, op by op.

  python experiments/profile_model.py --cases=graph_directions
  python experiments/profile_model.py --cases=tree,graph_directions --num_structures=120 \
      --profile_json=profile.json

Each configuration is built as experiments/bench_model.py builds it (the same runner:
`train.train_step` jit-compiled, batches from `input_pipeline`; case names as there). After
warm-up, --steps steps are traced with jax.profiler (a Perfetto trace), and each XLA op's
time is summed and attributed to the model module and pass it comes from (XLA's op_name
metadata; ops under transpose(...) belong to the backward pass). The ops of one step run
on several cores at once, so their times add up to more than the step's wall time.
"""

from __future__ import annotations

import glob
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402  (defines --cases, --steps, --num_structures, ...)
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Module groups to print per configuration.")
flags.DEFINE_string("profile_json", None, "Write the per-group times here.")

def trace_events(run, steps: int) -> list[dict]:
    """The Perfetto trace events of `steps` training steps."""
    import jax

    folder = tempfile.mkdtemp(prefix="cryknn_profile_")
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    run(steps)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def main(argv):
    del argv
    from cryknn import input_pipeline

    table = bench_model.load_table(FLAGS.num_structures, 20)
    counts = input_pipeline.element_counts(table.atomic_number)
    elements = input_pipeline.choose_elements(counts, num_elements=min(
        20, int((counts > 0).sum())))
    labels = input_pipeline.label_table(elements)[table.atomic_number]
    result = {}
    for case in bench_model.cases():
        if FLAGS.cases and case.name not in FLAGS.cases:
            continue
        run = bench_model.make_runner(table, labels, case, len(elements))
        run(2)  # compile and warm up
        start = time.perf_counter()
        atoms = run(FLAGS.steps)
        wall_ms = (time.perf_counter() - start) * 1000 / FLAGS.steps
        groups = common.group_times(trace_events(run, FLAGS.steps),
                                    common.op_sources(case.compiled.as_text()), FLAGS.steps)
        result[case.name] = {"step_ms": wall_ms, "loss_atoms_per_step": atoms / FLAGS.steps,
                             "op_ms_per_step": sum(groups.values()), "groups": groups}
        print(f"{case.name}: {wall_ms:.1f} ms per step (wall), "
              f"{sum(groups.values()):.1f} ms of ops (summed over cores)")
        print(common.markdown_table([{"group": g, "ms_per_step": ms} for g, ms in
                                     list(groups.items())[:FLAGS.top]],
                                    ["group", "ms_per_step"]))
    if FLAGS.profile_json:
        common.write_json(FLAGS.profile_json, result)


if __name__ == "__main__":
    app.run(main)
