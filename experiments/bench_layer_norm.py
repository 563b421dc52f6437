"""Why `models.layer_norm` normalises flat rows: LayerNorm forward and backward on this
CPU, applied to x as it is and to x as (rows, C), side by side in one run (ratios printed).

    python experiments/bench_layer_norm.py [--repeats=50]

Shapes: one graph pack (1, 4096, 192) and (1, 4096, 64), two packs (2, 2048, 192), the
tree model's roots (512, 1, 128).
"""

from __future__ import annotations

import time

from absl import app, flags

flags.DEFINE_integer("repeats", 50, "Timed calls per shape and form (best of 3 rounds).")
SHAPES = ((1, 4096, 192), (1, 4096, 64), (2, 2048, 192), (512, 1, 128))


def step_ms(shape, flat: bool) -> float:
    """Best mean ms over 3 rounds of jit(grad) of sum(LayerNorm(x)^2) w.r.t. params and x."""
    import flax.linen as nn
    import jax

    norm = nn.LayerNorm()
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = norm.init(jax.random.PRNGKey(1), x)

    def apply(p, v):
        return (norm.apply(p, v.reshape(-1, v.shape[-1])).reshape(v.shape) if flat
                else norm.apply(p, v))

    grad = jax.jit(jax.grad(lambda p, v: (apply(p, v) ** 2).sum(), argnums=(0, 1)))
    jax.block_until_ready(grad(params, x))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(flags.FLAGS.repeats):
            out = grad(params, x)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / flags.FLAGS.repeats * 1e3)
    return best


def main(argv):
    del argv
    print("| shape | as is, ms | flat rows, ms | ratio |\n|---|---|---|---|")
    for shape in SHAPES:
        as_is, flat = step_ms(shape, False), step_ms(shape, True)
        print(f"| {shape} | {as_is:.2f} | {flat:.2f} | {as_is / flat:.1f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
