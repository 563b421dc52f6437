"""Why `angular.power_spectra` is written as multiply-adds with a hand-written gradient:
the graph model's angular term in that form and in its plain form
(`angular.einsum_power_spectra`: a batched (L, P) x (P, C) matmul per node, JAX's own
gradient), forward alone and forward with the gradient, side by side in one run (ratios
printed).

    python experiments/bench_power_spectra.py [--repeats=50]

Shapes: one graph pack of the default run (4096 nodes, k = 5, 16 angular channels,
degrees 1..4) and a larger k (10). The values agree to float32 rounding
(tests/test_angular.py); the script prints the largest difference too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

flags.DEFINE_integer("repeats", 50, "Timed calls per shape and form (best of 3 rounds).")
SHAPES = ((4096, 5, 16, 4), (4096, 10, 16, 4))  # nodes, k, channels, degrees


def timings(nodes: int, k: int, channels: int, degrees: int) -> dict:
    """ms of forward and of forward + gradient for both forms, and their largest
    difference in value."""
    import jax
    import jax.numpy as jnp

    from cryknn import angular

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(nodes, k, 3)).astype(np.float32)
    kernels = angular.pair_kernels(jnp.asarray(vectors), degrees, first=1) / (k * k)
    weights = jnp.asarray(rng.normal(size=(nodes, k, channels)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(nodes, degrees * channels)), jnp.float32)
    out = {}
    for name, form in (("plain", angular.einsum_power_spectra),
                       ("shipped", angular.power_spectra)):
        forward = jax.jit(form)
        # Every array an argument: constants would be folded at compile time.
        with_grad = jax.jit(jax.grad(lambda kern, w, g, f=form: jnp.sum(f(kern, w) * g),
                                     argnums=1))
        out[name] = (common.best_ms(forward, (kernels, weights), flags.FLAGS.repeats),
                     common.best_ms(with_grad, (kernels, weights, cotangent),
                                    flags.FLAGS.repeats),
                     np.asarray(forward(kernels, weights)))
    out["difference"] = float(np.abs(out["plain"][2] - out["shipped"][2]).max())
    return out


def main(argv):
    del argv
    print("| nodes, k, channels, degrees | forward plain / shipped, ms | ratio | "
          "forward + gradient plain / shipped, ms | ratio | largest difference |\n"
          "|---|---|---|---|---|---|")
    for shape in SHAPES:
        t = timings(*shape)
        (pf, pg, _), (sf, sg, _) = t["plain"], t["shipped"]
        print(f"| {', '.join(map(str, shape))} | {pf:.3f} / {sf:.3f} | {pf / sf:.1f}x | "
              f"{pg:.3f} / {sg:.3f} | {pg / sg:.1f}x | {t['difference']:.1e} |", flush=True)


if __name__ == "__main__":
    app.run(main)
