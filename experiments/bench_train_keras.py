"""Training throughput of the seed model: cryknn (JAX/Flax) vs a Keras reimplementation.

The original research trained its two-stage model with Keras. This script builds that model
with Keras (TensorFlow backend): stage 1, a 3 x 64 sigmoid MLP with one sigmoid output per
element (binary cross-entropy); stage 2, a 3 x 128 sigmoid MLP with softmax over
[distances ++ stage-1 outputs] (cross-entropy), stage 1 held fixed for stage 2's loss (stop-
gradient), both losses weighted per atom by its element's class weight. It trains that and
cryknn's `seed` model on the same features, the same batch size and the same number of epochs,
side by side in one process, and reports steady-state training throughput (atoms/s; the
first epoch, which includes compilation, is timed apart) and the ratio.

  python experiments/bench_train_keras.py [--k=5] [--batch_size=512] [--epochs=4] [--json=F]

Features: the cryknn feature cache of --dataset/--data_dir (train split, top --num_elements
elements, --max_per_element per element) when it exists, else a toy set (say which).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryknn import input_pipeline  # noqa: E402


def load_features(args):
    """(x (A, k) float32, y (A,) int32, num_classes, description)."""
    path = input_pipeline.find_cache(args.data_dir, args.dataset, args.k, "train")
    if path is not None and not args.toy:
        fs = input_pipeline.FeatureSet.load(path).first_k(args.k)
        counts = input_pipeline.element_counts(fs.atomic_number)
        chosen = input_pipeline.choose_elements(counts, num_elements=args.num_elements)
        idx = input_pipeline.select_atoms(fs.atomic_number, chosen,
                                          max_per_element=args.max_per_element, seed=0)
        y = input_pipeline.label_table(chosen)[fs.atomic_number[idx]]
        return fs.distances[idx], y, len(chosen), f"{args.dataset} train split ({path})"
    zs = list(range(1, args.num_elements + 1))
    fs = input_pipeline.toy_features(zs, args.max_per_element, args.k)
    y = input_pipeline.label_table(zs)[fs.atomic_number]
    return fs.distances, y, len(zs), "toy features (no feature cache found)"


def time_epochs(run_epoch, epochs):
    """Seconds of the first epoch and of each later epoch."""
    times = []
    for e in range(epochs):
        t = time.perf_counter()
        run_epoch(e)
        times.append(time.perf_counter() - t)
    return times[0], times[1:]


def bench_jax(x, y, num_classes, weights, args):
    import jax
    import jax.numpy as jnp

    from cryknn import train

    cfg = train.Config(k=args.k, model="seed", batch_size=args.batch_size,
                       learning_rate=args.learning_rate, seed=0)
    par = train.Parallel.create()
    steps = len(y) // args.batch_size
    state = par.replicate(train.create_train_state(train.build_model(cfg, num_classes), cfg,
                                                   steps * args.epochs))
    step_fn = par.jit_train_step()
    w = par.replicate(jnp.asarray(weights))
    seed = par.replicate(np.int32(0))
    holder = {"state": state}

    def run_epoch(e):
        s = holder["state"]
        for batch in input_pipeline.epoch_batches(x, y, args.batch_size, seed=0, epoch=e):
            s, _ = step_fn(s, par.global_batch(batch), w, seed)
        jax.block_until_ready(s)
        holder["state"] = s

    first, rest = time_epochs(run_epoch, args.epochs)
    return first, rest, steps * args.batch_size, jax.device_count()


def build_keras_model(k, num_classes):
    import keras
    from keras import layers, ops

    inputs = keras.Input((k,), name="distances")
    h = inputs
    for _ in range(3):
        h = layers.Dense(64, activation="sigmoid")(h)
    stage1 = layers.Dense(num_classes, name="stage1")(h)  # logits; sigmoid in the loss
    fixed = layers.Lambda(lambda t: ops.stop_gradient(ops.sigmoid(t)))(stage1)
    h = layers.Concatenate()([inputs, fixed])
    for _ in range(3):
        h = layers.Dense(128, activation="sigmoid")(h)
    stage2 = layers.Dense(num_classes, name="stage2")(h)  # logits; softmax in the loss
    return keras.Model(inputs, {"stage1": stage1, "stage2": stage2})


def bench_keras(x, y, num_classes, weights, args):
    import keras
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    keras.utils.set_random_seed(0)
    model = build_keras_model(args.k, num_classes)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=1e-4),
        loss={"stage1": keras.losses.BinaryCrossentropy(from_logits=True),
              "stage2": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        jit_compile=args.keras_jit_compile)
    steps = len(y) // args.batch_size
    n = steps * args.batch_size  # same atoms per epoch as the JAX side (it drops the remainder)
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    sw = weights[y]
    times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    # One fit call as the original did: Keras shuffles every epoch itself.
    model.fit(x[:n], {"stage1": onehot[:n], "stage2": y[:n]},
              sample_weight={"stage1": sw[:n], "stage2": sw[:n]}, batch_size=args.batch_size,
              epochs=args.epochs, shuffle=True, verbose=0, callbacks=[EpochTimer()])
    first, rest = times[0], times[1:]
    return first, rest, n, str(model.jit_compile)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4, help="first one is warm-up (timed apart)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--num_elements", type=int, default=20)
    p.add_argument("--max_per_element", type=int, default=5000)
    p.add_argument("--dataset", default="crystal_structures/core_mof_2019_asr")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--toy", action="store_true", help="use toy features even if a cache exists")
    p.add_argument("--keras_jit_compile", default="auto",
                   help="Keras compile(jit_compile=...): auto, true or false")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is warm-up)")
    args.keras_jit_compile = {"auto": "auto", "true": True, "false": False}[
        str(args.keras_jit_compile).lower()]

    x, y, num_classes, source = load_features(args)
    weights = input_pipeline.class_weights(np.bincount(y, minlength=num_classes),
                                           "sqrt_inverse_frequency")
    print(f"features: {source}; {len(y)} atoms, k={args.k}, {num_classes} classes, "
          f"batch {args.batch_size}, {args.epochs} epochs")
    results = {"k": args.k, "batch_size": args.batch_size, "epochs": args.epochs,
               "atoms_per_epoch": None, "features": source}
    for name, fn in (("cryknn_jax", bench_jax), ("keras_tf", bench_keras)):
        first, rest, n, extra = fn(x, y, num_classes, weights, args)
        rate = n * len(rest) / sum(rest)
        results["atoms_per_epoch"] = n
        results[name] = {"atoms_per_s": rate, "first_epoch_s": first,
                         "steady_epoch_s": float(np.median(rest)), "detail": str(extra)}
        what = "devices" if name == "cryknn_jax" else "jit_compile"
        print(f"{name:>10}: {rate:12,.0f} atoms/s steady state (first epoch {first:.2f} s incl. "
              f"compilation, then {np.median(rest):.2f} s/epoch) [{what}={extra}]", flush=True)
    ratio = results["cryknn_jax"]["atoms_per_s"] / results["keras_tf"]["atoms_per_s"]
    results["ratio_jax_over_keras"] = ratio
    print(f"ratio cryknn/keras: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
