"""Train and evaluate an element classifier: `train_and_evaluate(config, workdir)`.

Every model trains the same way: class-weighted cross-entropy (`loss_fn`), AdamW with warmup
and cosine decay over `epochs` passes of the selected training atoms, batches in an order
fixed by (seed, epoch) so a resumed run continues exactly. `Trainer.fit` runs the steps;
after each epoch it estimates the validation metrics on at most `monitor_per_element` atoms
per element (the training curves) and calls its hooks (checkpointing, or whatever an
experiment needs: evaluation every n steps, timing). The final validation and test metrics
use every atom of the chosen elements.

Data parallel over every device of every process (`cryknn.parallel`). A non-finite loss or
parameters stop training with `TrainingDivergedError` before anything non-finite is saved.

Workdir after a run (see also `cryknn.checkpoints`):
  config.json, checkpoints/   the run definition and orbax checkpoints (resume from latest)
  metrics.json                test / validation metrics, confusion matrices, majority
                              baseline, flags, dataset build, timing
  confusion_matrix.png        row-normalised, element symbols on the axes (test split)
  training_curves.png         loss and accuracies per epoch
  misclassifications.csv      every wrongly predicted test atom
  metrics.jsonl, tensorboard/ one line / summary per epoch (losses, accuracies, lr, atoms/s)
  model/                      the trained model, parameters only (`cryknn.saved_model`)
  .lock                       held while a run uses the workdir
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cryknn import checkpoints
from cryknn import config as config_lib
from cryknn import errors
from cryknn import evaluate
from cryknn import input_pipeline
from cryknn import models
from cryknn import parallel
from cryknn import util

TrainState = train_state.TrainState
Log = Callable[[str], None]


def learning_rate_schedule(config: config_lib.Config, total_steps: int) -> optax.Schedule:
    """Linear warmup (at most a tenth of the run), then cosine decay to 1% at the end."""
    warmup = min(config.warmup_steps, max(total_steps // 10, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * 0.01)


def make_optimizer(config: config_lib.Config, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule`."""
    return optax.adamw(learning_rate_schedule(config, total_steps),
                       weight_decay=config.weight_decay)


def create_train_state(model: nn.Module, config: config_lib.Config,
                       total_steps: int) -> TrainState:
    inputs = input_pipeline.example_inputs(config_lib.input_spec(config))
    params = models.init_params(model, config.k, jax.random.key(config.seed), inputs)
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config, total_steps))


def loss_fn(outputs: dict, labels: jnp.ndarray, mask: jnp.ndarray,
            class_weights: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """Class-weighted cross-entropy, averaged over the real (mask 1) atoms of the batch.

    outputs['logits'] (B, C), or (G, N, C) with labels and mask (G, N) for graph batches:
    softmax cross-entropy (optax) times class_weights[label].
    outputs['stage1_logits'] (B, C), two-stage model only: one-vs-rest sigmoid binary
    cross-entropy (mean over classes) with the same per-atom class weight, added to the loss
    (the stop-gradient inside the model keeps the two stages' losses apart).
    Returns (loss, {'loss_sum', 'correct', 'count'}) with sums over the batch.
    """
    outputs = {key: value.reshape(-1, value.shape[-1]) for key, value in outputs.items()}
    labels, mask = labels.reshape(-1), mask.reshape(-1)  # graph batches: (G, N) nodes
    w = class_weights[labels] * mask
    count = jnp.maximum(mask.sum(), 1.0)
    per_atom = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], labels)
    if "stage1_logits" in outputs:
        onehot = jax.nn.one_hot(labels, outputs["stage1_logits"].shape[-1])
        per_atom = per_atom + optax.sigmoid_binary_cross_entropy(
            outputs["stage1_logits"], onehot).mean(axis=-1)
    loss = jnp.sum(w * per_atom) / count
    correct = jnp.sum((jnp.argmax(outputs["logits"], -1) == labels) * mask)
    return loss, {"loss_sum": loss * count, "correct": correct, "count": mask.sum()}


def train_step(state: TrainState, batch: dict, class_weights: jnp.ndarray,
               dropout_seed: jnp.ndarray) -> tuple[TrainState, dict]:
    """One optimiser step on a batch ({'inputs', 'label' (B,), 'mask' (B,)}).

    dropout_seed: () int32; dropout randomness is jax.random.key(dropout_seed) folded with
      the step (an integer, not a key: key arrays cannot be built from host data on every
      process of a multi-host run).
    Returns the new state and the batch sums of `loss_fn`.
    """
    dropout_rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    def objective(params):
        out = state.apply_fn({"params": params}, batch["inputs"], train=True,
                             rngs={"dropout": dropout_rng})
        return loss_fn(out, batch["label"], batch["mask"], class_weights)

    grads, metrics = jax.grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metrics


def predict_probs(apply_fn, params, inputs: dict) -> jnp.ndarray:
    """Model inputs of B atoms -> (B, C) softmax probabilities."""
    return jax.nn.softmax(apply_fn({"params": params}, inputs, train=False)["logits"], -1)


def all_finite(tree: Any) -> bool:
    return bool(jax.tree.reduce(lambda ok, x: ok and bool(jnp.all(jnp.isfinite(x))), tree, True))


# ----------------------------------------------------------------------------
# The trainer.


@dataclasses.dataclass
class Hook:
    """fn(trainer), called after every `every_steps`-th step and/or at the end of every
    epoch. The training clock (`Trainer.train_seconds`) stops while hooks run."""

    fn: Callable[["Trainer"], None]
    every_steps: int = 0
    at_epoch_end: bool = False

    def due(self, step: int, epoch_end: bool) -> bool:
        return (self.at_epoch_end and epoch_end) or bool(
            self.every_steps and step % self.every_steps == 0)


def checkpoint_hook(mngr) -> Hook:
    """Save the train state and history at the end of every epoch."""
    return Hook(lambda trainer: checkpoints.save(mngr, trainer.state, trainer.history),
                at_epoch_end=True)


def log_hooks(workdir: str) -> list[Hook]:
    """At the end of every epoch: metrics.jsonl (one line per epoch so far, rewritten
    atomically) and TensorBoard summaries in <workdir>/tensorboard (process 0 only)."""
    if jax.process_index() != 0:
        return []
    path = os.path.join(workdir, "metrics.jsonl")

    def write_jsonl(trainer: "Trainer") -> None:
        with util.atomic_open(path, "w") as f:
            for entry in trainer.history:
                f.write(json.dumps(util.finite_json(entry), allow_nan=False) + "\n")

    hooks = [Hook(write_jsonl, at_epoch_end=True)]
    writer = _summary_writer(os.path.join(workdir, "tensorboard"))
    if writer is not None:
        def summarise(trainer: "Trainer") -> None:
            entry = trainer.history[-1]
            for key, value in entry.items():
                if key not in ("epoch", "step") and value is not None:
                    writer.scalar(key, value, entry["step"])
            writer.flush()

        hooks.append(Hook(summarise, at_epoch_end=True))
    return hooks


def _summary_writer(folder: str):
    """flax's TensorBoard writer (it needs TensorFlow, which the train extra installs)."""
    try:
        with util.stderr_silenced():  # TensorFlow's C++ start-up notices
            from flax.metrics import tensorboard
    except ImportError:
        return None
    return tensorboard.SummaryWriter(folder)


@dataclasses.dataclass
class Trainer:
    """A model, its train state and the data-parallel machinery for one prepared data set."""

    config: config_lib.Config
    data: input_pipeline.PreparedData
    parallel: parallel.DataParallel
    model: nn.Module
    state: TrainState
    input_stats: tuple | None
    steps_per_epoch: int
    batches: input_pipeline.AtomBatches | input_pipeline.GraphBatches
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0  # training steps only: evaluation and hooks excluded
    trained_atoms: int = 0
    _epoch_start_s: float = 0.0  # train_seconds when the current epoch began

    @classmethod
    def create(cls, config: config_lib.Config, data: input_pipeline.PreparedData) -> "Trainer":
        par = parallel.DataParallel.create()
        if config.batch_size % par.num_devices:
            raise errors.ConfigError(f"--batch_size={config.batch_size} is not a multiple of "
                                     f"the {par.num_devices} devices")
        batches = input_pipeline.batches_for(
            config_lib.input_spec(config), config.batch_size, par.num_devices,
            jax.local_device_count(),
            input_pipeline.class_repeats(data.train_counts, config.max_per_element))
        steps_per_epoch = parallel.global_min(batches.steps_per_epoch(data.train))
        if steps_per_epoch < 1:
            raise errors.ConfigError(f"--batch_size={config.batch_size} is larger than the "
                                     f"{len(data.train)} selected training atoms")
        input_stats = models.input_statistics_of(config, data.train.distances,
                                                 sum_fn=parallel.global_sum)
        model = models.create_model(config, len(data.symbols), input_stats)
        state = create_train_state(model, config, steps_per_epoch * config.epochs)
        return cls(config, data, par, model, par.replicate(state), input_stats,
                   steps_per_epoch, batches)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def input_spec(self) -> config_lib.InputSpec:
        return config_lib.input_spec(self.config)

    @property
    def num_params(self) -> int:
        return models.param_count(self.state.params)

    @functools.cached_property
    def _predict(self):
        return self.parallel.jit_predict(functools.partial(predict_probs, self.model.apply))

    def probs(self, atoms: input_pipeline.LabelledAtoms) -> np.ndarray:
        """(A, C) probabilities of this process's selected atoms under the current params;
        every process steps through the same number of batches."""
        batches = list(self.batches.evaluation(atoms))
        steps = parallel.global_max(len(batches))
        probs = np.zeros((len(atoms), len(self.data.symbols)), np.float32)
        for b in range(steps):
            if b < len(batches):
                batch, position = batches[b]
            else:  # this process is out of atoms; keep in step with the others
                batch, position = self.batches.filler(), None
            inputs = self.parallel.global_batch(batch["inputs"])
            out = self.parallel.local(self._predict(self.state.params, inputs))
            if position is not None:
                probs[position[position >= 0]] = out[position >= 0]
        return probs

    def monitor(self) -> dict:
        """Validation loss, accuracy and balanced accuracy, estimated from `data.monitor`."""
        monitor = self.data.monitor
        return evaluate.monitor_metrics(self.probs(monitor), monitor.labels,
                                        self.data.validation_support)

    def restore(self, mngr, log: Log = parallel.log) -> bool:
        """Continue from the newest intact checkpoint of mngr, if there is one."""
        if mngr.latest_step() is None:
            return False
        self.state, self.history, _ = checkpoints.restore(mngr, self.state, log=log)
        if self.history:  # the run's clock and atom count carry on from the checkpoint
            self.train_seconds = self._epoch_start_s = self.history[-1]["train_time_s"]
            last = self.history[-1]
            self.trained_atoms = last.get("trained_atoms", last["step"] * self.config.batch_size)
        return True

    def fit(self, hooks: Sequence[Hook] = (), until_epoch: int | None = None,
            log: Log = parallel.log) -> None:
        """Train from the current step to the end of epoch `until_epoch` (default: the last)."""
        end = self.steps_per_epoch * min(until_epoch or self.config.epochs, self.config.epochs)
        while int(self.state.step) < end:
            self._fit_epoch(hooks, log)

    def _fit_epoch(self, hooks: Sequence[Hook], log: Log) -> None:
        config, par = self.config, self.parallel
        step = int(self.state.step)
        epoch, start = divmod(step, self.steps_per_epoch)
        step_fn = self._train_step
        weights = par.replicate(jnp.asarray(self.data.class_weights))
        dropout_seed = par.replicate(np.int32(config.seed + 1))
        window, epoch_sums = [], []
        clock = t_window = time.perf_counter()
        for local in self.batches.epoch(self.data.train, seed=config.seed + jax.process_index(),
                                        epoch=epoch, start=start):
            if step >= (epoch + 1) * self.steps_per_epoch:
                break
            self.state, metrics = step_fn(self.state, par.global_batch(local), weights,
                                          dropout_seed)
            step += 1
            window.append(metrics)
            epoch_end = step == (epoch + 1) * self.steps_per_epoch
            if step % config.log_every == 0 or epoch_end:
                sums = _sum_metrics(window)
                self.trained_atoms += int(sums["count"])
                epoch_sums.append(sums)
                window = []
                self._check_finite(sums, step, epoch)
                log(f"step {step}/{self.total_steps} epoch {epoch + 1}/{config.epochs} "
                    f"loss {sums['loss_sum'] / sums['count']:.4f} "
                    f"acc {sums['correct'] / sums['count']:.4f} "
                    f"{sums['count'] / max(time.perf_counter() - t_window, 1e-9):,.0f} atoms/s")
                t_window = time.perf_counter()
            due = [hook for hook in hooks if hook.due(step, epoch_end)]
            if due or epoch_end:
                jax.block_until_ready(self.state)
                self.train_seconds += time.perf_counter() - clock
                if epoch_end:
                    self._end_epoch(epoch, step, epoch_sums, log)
                for hook in due:
                    hook.fn(self)
                clock = t_window = time.perf_counter()

    @functools.cached_property
    def _train_step(self):
        return self.parallel.jit_step(train_step, num_replicated_args=2)

    def _check_finite(self, sums: dict, step: int, epoch: int) -> None:
        loss = sums["loss_sum"] / max(sums["count"], 1)
        if not math.isfinite(loss):
            raise errors.TrainingDivergedError(
                f"training diverged at step {step} (epoch {epoch + 1}): the loss is {loss}; "
                f"checkpoints keep the last finite state; try a lower --learning_rate")

    def _end_epoch(self, epoch: int, step: int, epoch_sums: list, log: Log) -> None:
        if not all_finite(self.state.params):
            raise errors.TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}: parameters are not finite; "
                f"checkpoints keep the last finite state; try a lower --learning_rate")
        t_val = time.perf_counter()
        val = self.monitor()
        total = jax.tree.map(lambda *m: sum(m), *epoch_sums)
        self.history.append({
            "epoch": epoch + 1, "step": step, "train_time_s": self.train_seconds,
            "train_loss": total["loss_sum"] / total["count"],
            "train_accuracy": total["correct"] / total["count"],
            "validation_loss": val["loss"], "validation_accuracy": val["accuracy"],
            "validation_balanced_accuracy": val["balanced_accuracy"],
            "learning_rate": float(learning_rate_schedule(self.config, self.total_steps)(step)),
            "atoms_per_s": total["count"] / max(self.train_seconds - self._epoch_start_s, 1e-9),
            "trained_atoms": self.trained_atoms})
        self._epoch_start_s = self.train_seconds
        log(f"epoch {epoch + 1}: validation accuracy {val['accuracy']:.4f} balanced "
            f"{val['balanced_accuracy']:.4f} (estimated from {len(self.data.monitor)} atoms, "
            f"{time.perf_counter() - t_val:.1f} s)")

    def evaluate(self, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
        """Full metrics of split `name` ('validation' or 'test') with the majority baseline;
        also returns this process's (A, C) probabilities and the (C, C) confusion matrix."""
        atoms = getattr(self.data, name)
        probs = self.probs(atoms)
        metrics, cm = evaluate.split_metrics(probs, atoms.labels, self.data.symbols)
        metrics["majority_baseline"] = evaluate.majority_baseline(self.data.train_counts, cm)
        # Over this process's atoms: with several processes, each has its own structures.
        metrics["intervals"] = evaluate.bootstrap_intervals(
            atoms.labels, probs, self.data.group_names(atoms), len(self.data.symbols))
        return metrics, probs, cm


def _sum_metrics(window: list) -> dict:
    return jax.tree.map(lambda *m: float(np.sum(m)), *jax.device_get(window))


# ----------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: config_lib.Config, workdir: str) -> dict:
    """Train `config.model` on the train split, checkpoint to workdir (resuming from the latest
    checkpoint there), evaluate on validation and test, and write the reports. Returns the
    metrics dict written to metrics.json."""
    config_lib.validate(config)
    checkpoints.check_workdir(workdir)
    if jax.process_index() != 0:
        return _train_and_evaluate(config, workdir)
    with checkpoints.WorkdirLock(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: config_lib.Config, workdir: str) -> dict:
    t_start = time.time()
    data = input_pipeline.prepare(config)
    trainer = Trainer.create(config, data)
    run = checkpoints.run_definition(config, data, trainer.input_stats, trainer.num_params)
    checkpoints.check_same_run(workdir, run)
    if jax.process_index() == 0:
        checkpoints.write_run(workdir, run)
    mngr = checkpoints.manager(workdir)
    if trainer.restore(mngr):
        parallel.log(f"resumed from {workdir}/checkpoints at step {int(trainer.state.step)}")
    parallel.log(f"model {config.model}: {trainer.num_params:,} parameters; "
                 f"{len(data.train)} training atoms, {trainer.steps_per_epoch} steps/epoch x "
                 f"{config.epochs} epochs, batch {config.batch_size} on "
                 f"{jax.device_count()} device(s)")
    try:
        trainer.fit(hooks=[checkpoint_hook(mngr), *log_hooks(workdir)])
    finally:
        mngr.wait_until_finished()
        mngr.close()
    t_eval = time.time()
    results = {name: trainer.evaluate(name) for name in ("validation", "test")}
    timing = {"load_features_s": data.load_seconds, "train_s": trainer.train_seconds,
              "train_atoms_per_s": (trainer.trained_atoms / trainer.train_seconds
                                    if trainer.trained_atoms else None),
              "evaluate_s": time.time() - t_eval, "devices": jax.device_count(),
              "processes": jax.process_count()}
    metrics = write_reports(workdir, trainer, results, timing, t_start)
    if jax.process_index() == 0:
        checkpoints.export(workdir, jax.device_get(trainer.state.params), run, metrics,
                           int(trainer.state.step), trainer.total_steps)
    t = metrics["test"]
    parallel.log(f"test: accuracy {t['accuracy']:.4f}, balanced accuracy "
                 f"{t['balanced_accuracy']:.4f}, top-3 {t['top3_accuracy']:.4f} (majority "
                 f"baseline accuracy {metrics['majority_baseline']['accuracy']:.4f}); total "
                 f"{metrics['timing']['total_s']:.0f} s; wrote {workdir}/metrics.json")
    return metrics


def write_reports(workdir: str, trainer: Trainer, results: dict, timing: dict,
                  t_start: float) -> dict:
    """metrics.json, the misclassified test atoms, and the figures; returns the metrics."""
    data, config = trainer.data, trainer.config
    _, test_probs, test_cm = results["test"]
    suffix = "" if jax.process_count() == 1 else f".p{jax.process_index()}"
    test = data.test
    evaluate.write_misclassifications(
        os.path.join(workdir, f"misclassifications{suffix}.csv"),
        test.table.atom_structure_ids(test.rows), test.table.site_label[test.rows],
        test.labels, test_probs, data.symbols)
    evaluate.write_predictions(
        os.path.join(workdir, f"test_predictions{suffix}.npz"), data.group_names(test),
        test.table.atom_structure_ids(test.rows), test.table.site_label[test.rows],
        test.labels, test_probs, data.symbols)
    metrics = {
        "test": results["test"][0],
        "validation": results["validation"][0],
        "majority_baseline": results["test"][0]["majority_baseline"],
        "elements": data.symbols,
        "flags": dataclasses.asdict(config),
        "dataset_fingerprint": data.dataset["fingerprint"],
        "dataset_build": data.dataset["build_info"],
        "num_params": trainer.num_params,
        "history": trainer.history,
        "timing": {**timing, "total_s": time.time() - t_start},
    }
    if jax.process_index() == 0:
        evaluate.plot_confusion(test_cm, data.symbols,
                                os.path.join(workdir, "confusion_matrix.png"),
                                title=f"{config.model}, k={config.k}, test split "
                                      f"(row-normalised)")
        if trainer.history:
            evaluate.plot_curves(trainer.history, os.path.join(workdir, "training_curves.png"))
        util.write_json(os.path.join(workdir, "metrics.json"), metrics)
    return metrics
