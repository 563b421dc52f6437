"""Training throughput of the seed model: cryknn (JAX/Flax) vs a Keras reimplementation.

The original research trained its two-stage model with Keras. This script builds that model
with Keras (TensorFlow backend): stage 1, a 3 x 64 sigmoid MLP with one sigmoid output per
element (binary cross-entropy); stage 2, a 3 x 128 sigmoid MLP with softmax over
[distances ++ stage-1 outputs] (cross-entropy), stage 1 held fixed for stage 2's loss (stop-
gradient), both losses weighted per atom by its element's class weight. It trains that and
cryknn's `two_stage` model (its `Trainer.fit`, one epoch at a time) on the same atoms, the
same batch size and the same number of epochs, side by side in one process, and reports
steady-state training throughput (atoms/s; the first epoch, which includes compilation, is
timed apart) and the ratio.

  python experiments/bench_train_keras.py [--k=5] [--batch_size=512] [--epochs=4] [--json=F]
      [--toy] [any flag of python -m cryknn.main: --dataset, --data_dir, --max_per_element ...]

Data: the training split of --dataset prepared exactly as for cryknn.main (building and
featurising it when needed), or with --toy a synthetic table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def prepare(toy: bool):
    """(config, prepared data) of the two-stage model on the run flags' dataset (or a toy)."""
    from cryknn import input_pipeline
    from tests import toy_data

    overrides = {"model": "two_stage", "log_every": 10**9}
    if toy:
        overrides.update(dataset="toy/bench", data_dir=tempfile.mkdtemp(prefix="cryknn_toy_"))
        config = common.run_config(**overrides)
        zs = list(range(1, config.num_elements + 1))
        per_element = config.max_per_element or 5000
        toy_data.write_toy_cache(config.data_dir, config.dataset, config.k, zs,
                                 (per_element, 100, 100))
    config = common.run_config(**overrides)
    return config, input_pipeline.prepare(config, log=lambda message: None)


def time_jax(config, data):
    """(first epoch s, later epochs' s, atoms per epoch, devices) of Trainer.fit."""
    import jax

    from cryknn import train

    trainer = train.Trainer.create(config, data)
    times = []
    for epoch in range(1, config.epochs + 1):
        before = trainer.train_seconds
        trainer.fit(until_epoch=epoch, log=lambda message: None)
        times.append(trainer.train_seconds - before)
    return times[0], times[1:], trainer.steps_per_epoch * config.batch_size, jax.device_count()


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


def time_keras(x, y, num_classes, weights, config, jit_compile):
    import keras
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    keras.utils.set_random_seed(0)
    model = build_keras_model(config.k, num_classes)
    model.compile(
        optimizer=keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
        loss={"stage1": keras.losses.BinaryCrossentropy(from_logits=True),
              "stage2": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        jit_compile=jit_compile)
    steps = len(y) // config.batch_size
    n = steps * config.batch_size  # same atoms per epoch as the JAX side (it drops the remainder)
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
              sample_weight={"stage1": sw[:n], "stage2": sw[:n]}, batch_size=config.batch_size,
              epochs=config.epochs, shuffle=True, verbose=0, callbacks=[EpochTimer()])
    first, rest = times[0], times[1:]
    return first, rest, n, str(model.jit_compile)


def define_flags() -> None:
    from absl import flags

    common.define_run_flags()
    flags.DEFINE_bool("toy", False, "Synthetic features instead of the dataset.")
    flags.DEFINE_string("keras_jit_compile", "auto", "Keras compile(jit_compile=...): auto, "
                        "true or false.")
    flags.DEFINE_string("json", None, "Write the results here.")


def main(argv) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    jit_compile = {"auto": "auto", "true": True, "false": False}.get(
        FLAGS.keras_jit_compile.lower())
    if jit_compile is None or FLAGS.epochs < 2:
        raise SystemExit("error: --keras_jit_compile is auto, true or false; --epochs >= 2 "
                         "(the first is warm-up)")
    config, data = prepare(FLAGS.toy)
    x, y = data.train.distances, data.train.labels
    num_classes = len(data.symbols)
    source = config.dataset + (" (synthetic)" if FLAGS.toy else " train split")
    print(f"features: {source}; {len(y)} atoms, k={config.k}, {num_classes} classes, "
          f"batch {config.batch_size}, {config.epochs} epochs")
    results = {"k": config.k, "batch_size": config.batch_size, "epochs": config.epochs,
               "atoms_per_epoch": None, "features": source}
    runs = (("cryknn_jax", lambda: time_jax(config, data)),
            ("keras_tf", lambda: time_keras(x, y, num_classes, data.class_weights, config,
                                            jit_compile)))
    for name, fn in runs:
        first, rest, n, extra = fn()
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
    if FLAGS.json:
        common.write_json(FLAGS.json, results)
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/bench_train_keras.py",
                     define_flags=define_flags)
