"""Why the message-passing models run their layers on flat rows (`message_passing.on_rows`): a
LayerNorm or a Dense, forward and backward on this CPU, applied to x as it is and to x as
(rows, C), side by side in one run (ratios printed).

    python experiments/bench_on_rows.py [--repeats=50]

Shapes: LayerNorm on one graph pack (1, 4096, 192) and (1, 4096, 64), two packs
(2, 2048, 192), the tree model's roots (512, 1, 128); Dense on the graph model's edges
(1, 4096, 5, 16) -> 80 and nodes (1, 4096, 64) -> 80, and on the tree model's first-hop
edges (512, 5, 5, 24) -> 64.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

flags.DEFINE_integer("repeats", 50, "Timed calls per shape and form (best of 3 rounds).")
CASES = (("LayerNorm", (1, 4096, 192), None), ("LayerNorm", (1, 4096, 64), None),
         ("LayerNorm", (2, 2048, 192), None), ("LayerNorm", (512, 1, 128), None),
         ("Dense", (1, 4096, 5, 16), 80), ("Dense", (1, 4096, 64), 80),
         ("Dense", (512, 5, 5, 24), 64))


def step_ms(kind: str, shape: tuple, features: int | None, flat: bool) -> float:
    """Best mean ms over 3 rounds of jit(grad) of sum(layer(x)^2) w.r.t. params and x."""
    import flax.linen as nn
    import jax

    layer = nn.LayerNorm() if kind == "LayerNorm" else nn.Dense(features)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = layer.init(jax.random.PRNGKey(1), x)

    def apply(p, v):
        if not flat:
            return layer.apply(p, v)
        y = layer.apply(p, v.reshape(-1, v.shape[-1]))
        return y.reshape(*v.shape[:-1], y.shape[-1])

    grad = jax.jit(jax.grad(lambda p, v: (apply(p, v) ** 2).sum(), argnums=(0, 1)))
    return common.best_ms(grad, (params, x), flags.FLAGS.repeats)


def main(argv):
    del argv
    print("| layer | shape | as is, ms | flat rows, ms | ratio |\n|---|---|---|---|---|")
    for kind, shape, features in CASES:
        as_is = step_ms(kind, shape, features, False)
        flat = step_ms(kind, shape, features, True)
        out = f" -> {features}" if features else ""
        print(f"| {kind} | {shape}{out} | {as_is:.2f} | {flat:.2f} | {as_is / flat:.1f}x |",
              flush=True)


if __name__ == "__main__":
    app.run(main)
