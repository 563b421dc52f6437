"""Start-up of `cryknn predict` on one CIF against importing JAX and Flax, side by side.

    python experiments/bench_startup.py [--rounds=5] [--cif=FILE] [--model_name=NAME] [--json=F]
    python experiments/bench_startup.py --workdir=W    # the model saved in W/model

Each round runs, one after another in fresh processes:
  import     python -c "import jax, flax.linen"       (the floor any JAX tool pays)
  cold       cryknn predict FILE with an empty XLA compilation cache
  warm       cryknn predict FILE again, the cache now in place
The medians over rounds and the ratios warm / import and cold / import are printed (the
target: warm at most 2x import). FILE defaults to the first CoRE MOF structure of the
embedded archive; the model to the checking default (`--model_name` picks another
shipped model, e.g. the graph model `default`; `--workdir` a model saved in W/model, e.g.
an ensemble before it is shipped).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402



def example_cif(folder: str) -> str:
    """The first CoRE MOF 2019-ASR structure of the embedded archive, as a CIF file."""
    from cryknn import cif

    name, data = next(cif.iter_tar_cifs(cif.core_mof_archive("2019-ASR"), 1))
    path = os.path.join(folder, os.path.basename(name))
    Path(path).write_bytes(data)
    return path


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {result.stderr[-500:]}")
    return seconds


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("rounds", 5, "Rounds (each: import, cold predict, warm predict).")
    flags.DEFINE_string("cif", None, "The CIF to score (default: a CoRE MOF structure).")
    flags.DEFINE_string("model_name", None, "Shipped model to predict with (default: the "
                        "checking default, as `cryknn predict` without --model_name).")
    flags.DEFINE_string("workdir", None, "Predict with the model saved in this workdir's "
                        "model/ folder instead (as `cryknn predict --workdir`).")
    flags.DEFINE_string("json", None, "Write the results here.")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    scratch = tempfile.mkdtemp(prefix="cryknn_startup_")
    cif = FLAGS.cif or example_cif(scratch)
    env = dict(os.environ, PYTHONPATH=str(common.REPO), JAX_PLATFORMS="cpu")
    predict = [sys.executable, "-m", "cryknn.cli", "predict", cif]
    if FLAGS.model_name:
        predict.append(f"--model_name={FLAGS.model_name}")
    if FLAGS.workdir:
        predict.append(f"--workdir={FLAGS.workdir}")
    times: dict[str, list[float]] = {"import": [], "cold": [], "warm": []}
    for r in range(FLAGS.rounds):
        cache = os.path.join(scratch, f"xla{r}")  # empty: a cold start
        env_round = dict(env, CRYKNN_XLA_CACHE=cache)
        times["import"].append(timed([sys.executable, "-c", "import jax, flax.linen"], env))
        times["cold"].append(timed(predict, env_round))
        times["warm"].append(timed(predict, env_round))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    results = {"cif": cif, "model_name": FLAGS.model_name or (
                   FLAGS.workdir and f"workdir {FLAGS.workdir}") or "checking default",
               "rounds": FLAGS.rounds, "seconds": times, "median_s": median,
               "warm_over_import": median["warm"] / median["import"],
               "cold_over_import": median["cold"] / median["import"]}
    print(f"median: import jax+flax {median['import']:.2f} s, cryknn predict cold "
          f"{median['cold']:.2f} s ({results['cold_over_import']:.2f}x), warm "
          f"{median['warm']:.2f} s ({results['warm_over_import']:.2f}x)")
    if FLAGS.json:
        common.write_json(FLAGS.json, results)
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/bench_startup.py",
                     define_flags=define_flags)
