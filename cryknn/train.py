"""Train and evaluate an element classifier on k-NN distances: `train_and_evaluate`.

Data parallel over every device of every process: one 1-D mesh ('data',) from
`jax.make_mesh`; batches are sharded along it with `NamedSharding(mesh, P('data'))`, the
train state is replicated, and XLA inserts the gradient all-reduce. Each process reads its
own part of every split (`input_pipeline.load_features(process_index=...)`) and feeds its
local slice of each global batch (`jax.make_array_from_process_local_data`).

Both models train the same way: class-weighted cross-entropy (`loss_fn`), AdamW with warmup
and cosine decay over `epochs` passes of the selected training atoms, batches in an order
fixed by (seed, epoch) so a resumed run continues exactly. After each epoch the validation
accuracy is estimated on at most `monitor_per_element` atoms per element (the curves); the
final validation and test metrics use every atom of the chosen elements.

Workdir layout after a run:
  config.json                 flags + what predict needs (k, elements, model, feature scaling)
  checkpoints/<step>/         orbax: train state and per-epoch history (resume from latest)
  metrics.json                test / validation metrics, majority baseline, flags, timing
  confusion_matrix.png        row-normalised, element symbols on the axes (test split)
  training_curves.png         loss and accuracies per epoch
  misclassifications.csv      every wrongly predicted test atom
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

from cryknn import elements as elements_lib
from cryknn import evaluate
from cryknn import input_pipeline
from cryknn import models

DEFAULT_DATASET = "crystal_structures/core_mof_2019_asr"


class ConfigError(ValueError):
    """A flag value or workdir that cannot be used; the message is one readable line."""


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions whose message is meant for the user (CLIs print one line, no traceback).

    Errors of modules that were never imported cannot have been raised, so only loaded
    modules are asked (this keeps TFDS out of a CLI that does not need it).
    """
    errors: list[type[Exception]] = [ConfigError, input_pipeline.SelectionError,
                                     elements_lib.UnknownElementError]
    for module, name in (("cryknn.featurize", "FeaturizeError"), ("cryknn.data", "DataError"),
                         ("cryknn.data", "DatasetError")):
        err = getattr(sys.modules.get(module), name, None)
        if isinstance(err, type) and issubclass(err, Exception):
            errors.append(err)
    return tuple(errors)


@dataclasses.dataclass
class Config:
    """Everything a run depends on (the absl flags of cryknn.main map onto these fields)."""

    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    k: int = 5
    num_elements: int = 20
    elements: str | None = None  # explicit 'C,N,O,...' overrides num_elements
    max_per_element: int = 40000  # cap on training atoms per element (0: no cap)
    model: str = "mlp"
    class_weighting: str = "sqrt_inverse_frequency"
    epochs: int = 15
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    seed: int = 0
    log_every: int = 200  # steps between progress lines
    monitor_per_element: int = 2000  # validation atoms per element for per-epoch curves
    multihost: bool = False
    # mlp size (ignored by the seed model)
    width: int = 128
    depth: int = 2
    dropout: float = 0.1
    features: str = "raw"

    def model_kwargs(self) -> dict:
        if self.model == "mlp":
            return {"width": self.width, "depth": self.depth, "dropout": self.dropout,
                    "features": self.features}
        return {}


# Fields that define what a workdir's checkpoints mean; a resumed run must match them.
RUN_DEFINING = ("dataset", "k", "elements_resolved", "max_per_element", "model", "model_kwargs",
                "class_weighting", "epochs", "batch_size", "learning_rate", "weight_decay",
                "warmup_steps", "seed")


def validate(config: Config) -> None:
    """Raise ConfigError (one line) for values that cannot work, before any data is read."""
    if config.k < 1:
        raise ConfigError(f"--k must be at least 1, got {config.k}")
    if config.model not in models.MODEL_NAMES:
        raise ConfigError(f"--model must be one of {', '.join(models.MODEL_NAMES)}, "
                          f"got {config.model!r}")
    if config.class_weighting not in input_pipeline.CLASS_WEIGHTINGS:
        raise ConfigError(f"--class_weighting must be one of "
                          f"{', '.join(input_pipeline.CLASS_WEIGHTINGS)}, "
                          f"got {config.class_weighting!r}")
    if config.elements:
        try:
            elements_lib.parse_element_list(config.elements)
        except elements_lib.UnknownElementError as e:
            raise ConfigError(f"--elements: {e}") from None
    elif config.num_elements < 2:
        raise ConfigError(f"--num_elements must be at least 2, got {config.num_elements}")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.max_per_element < 0:
        raise ConfigError(f"--max_per_element must be >= 0 (0: no cap), "
                          f"got {config.max_per_element}")
    if not config.learning_rate > 0:
        raise ConfigError(f"--learning_rate must be positive, got {config.learning_rate}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
    if config.batch_size % jax.device_count():
        raise ConfigError(f"--batch_size={config.batch_size} is not a multiple of the "
                          f"{jax.device_count()} devices")


def check_workdir(workdir: str) -> None:
    """Create workdir and prove it is writable, or raise ConfigError."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --workdir={workdir}: {e.strerror or e}") from None


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _global_sum(x: np.ndarray) -> np.ndarray:
    """Sum of a host numpy array over processes (identity with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def _global_min(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    return int(np.min(multihost_utils.process_allgather(np.asarray(x))))


def _global_max(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    return int(np.max(multihost_utils.process_allgather(np.asarray(x))))


# ----------------------------------------------------------------------------
# Data preparation.


@dataclasses.dataclass
class Split:
    """Selected atoms of one split on this process: features (A, k), labels (A,) in 0..C-1."""

    features: input_pipeline.FeatureSet
    x: np.ndarray
    y: np.ndarray


@dataclasses.dataclass
class Prepared:
    element_list: list[int]  # atomic numbers, class index order
    symbols: list[str]
    train: Split
    validation: Split
    test: Split
    monitor: Split  # validation atoms, at most monitor_per_element per element
    validation_support: np.ndarray  # (C,) validation atoms per class, all processes
    train_counts: np.ndarray  # (C,) selected training atoms per class, all processes
    class_weights: np.ndarray  # (C,) float32
    feature_mean: list[float] | None
    feature_std: list[float] | None
    load_seconds: float


def _split(features: input_pipeline.FeatureSet, table: np.ndarray, index: np.ndarray) -> Split:
    sel = features.take(index)
    return Split(sel, sel.distances.astype(np.float32), table[sel.atomic_number])


def prepare_data(config: Config, log: Callable[[str], None] = _log) -> Prepared:
    """Load (or featurise and cache) all splits, choose elements, select and label atoms."""
    start = time.time()
    pi, pc = jax.process_index(), jax.process_count()
    feats = {
        split: input_pipeline.load_features(config.dataset, split, config.k,
                                            data_dir=config.data_dir, process_index=pi,
                                            process_count=pc, log=log)
        for split in ("train", "validation", "test")
    }
    counts = _global_sum(input_pipeline.element_counts(feats["train"].atomic_number))
    try:
        element_list = input_pipeline.choose_elements(
            counts, num_elements=config.num_elements, elements=config.elements)
    except input_pipeline.SelectionError as e:
        raise ConfigError(str(e)) from None
    table = input_pipeline.label_table(element_list)
    cap = config.max_per_element // pc if config.max_per_element else None
    train_idx = input_pipeline.select_atoms(feats["train"].atomic_number, element_list,
                                            max_per_element=cap, seed=config.seed + 1000 * pi)
    eval_idx = {s: np.flatnonzero(table[feats[s].atomic_number] >= 0)
                for s in ("validation", "test")}
    train = _split(feats["train"], table, train_idx)
    train_counts = _global_sum(np.bincount(train.y, minlength=len(element_list)))
    weights = input_pipeline.class_weights(train_counts, config.class_weighting)
    mean = std = None
    if config.model == "mlp":
        mean, std = models.feature_stats(train.x, config.features, sum_fn=_global_sum)
    symbols = [elements_lib.symbol(z) for z in element_list]
    validation = _split(feats["validation"], table, eval_idx["validation"])
    monitor_idx = input_pipeline.select_atoms(
        validation.features.atomic_number, element_list,
        max_per_element=max(config.monitor_per_element // pc, 1), seed=config.seed + 7)
    log(f"elements ({len(symbols)}): {','.join(symbols)}; training atoms per element: "
        + ", ".join(f"{s} {n}" for s, n in zip(symbols, train_counts)))
    return Prepared(
        element_list=element_list, symbols=symbols, train=train,
        validation=validation,
        monitor=Split(validation.features.take(monitor_idx), validation.x[monitor_idx],
                      validation.y[monitor_idx]),
        validation_support=_global_sum(np.bincount(validation.y, minlength=len(element_list))),
        test=_split(feats["test"], table, eval_idx["test"]),
        train_counts=train_counts, class_weights=weights, feature_mean=mean, feature_std=std,
        load_seconds=time.time() - start)


# ----------------------------------------------------------------------------
# Model, loss, steps.


TrainState = train_state.TrainState


def build_model(config: Config, num_classes: int, feature_mean=None, feature_std=None):
    return models.create_model(config.model, num_classes, k=config.k, feature_mean=feature_mean,
                               feature_std=feature_std, **config.model_kwargs())


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 1% over the whole run."""
    warmup = min(config.warmup_steps, max(total_steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * 0.01)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def create_train_state(model: nn.Module, config: Config, total_steps: int) -> TrainState:
    params = models.init_params(model, config.k, jax.random.key(config.seed))
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config, total_steps))


def loss_fn(outputs: dict, labels: jnp.ndarray, mask: jnp.ndarray,
            class_weights: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """Class-weighted cross-entropy, averaged over the real (mask 1) atoms of the batch.

    outputs['logits'] (B, C): softmax cross-entropy (optax) times class_weights[label].
    outputs['stage1_logits'] (B, C), seed model only: one-vs-rest sigmoid binary
    cross-entropy (mean over classes) with the same per-atom class weight, added to the loss
    (the stop-gradient inside the model keeps the two stages' losses apart).
    Returns (loss, {'loss_sum', 'correct', 'count'}) with sums over the batch.
    """
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
               seed: jnp.ndarray) -> tuple[TrainState, dict]:
    """One optimiser step on a (B, k) batch; returns the new state and batch sums.

    seed: () int32 (dropout randomness is jax.random.key(seed) folded with the step) or a
      PRNG key (single process only: key arrays cannot be built from host data on every
      process, so the multi-host path passes an integer).
    """
    key = seed if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.key(seed)
    dropout_rng = jax.random.fold_in(key, state.step)

    def objective(params):
        out = state.apply_fn({"params": params}, batch["distances"], train=True,
                             rngs={"dropout": dropout_rng})
        return loss_fn(out, batch["label"], batch["mask"], class_weights)

    grads, metrics = jax.grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metrics


def predict_probs(apply_fn, params, distances: jnp.ndarray) -> jnp.ndarray:
    """(B, k) distances -> (B, C) softmax probabilities."""
    return jax.nn.softmax(apply_fn({"params": params}, distances, train=False)["logits"], -1)


@dataclasses.dataclass
class Parallel:
    """The mesh and shardings of data-parallel training, and the jitted steps."""

    mesh: jax.sharding.Mesh
    data: NamedSharding
    replicated: NamedSharding

    @classmethod
    def create(cls, devices: Sequence[jax.Device] | None = None) -> "Parallel":
        """Mesh over `devices` (default: every device of every process)."""
        devices = jax.devices() if devices is None else list(devices)
        # Auto axes: XLA propagates the batch sharding (and inserts the gradient all-reduce)
        # through ops such as dropout's random mask without per-op annotations.
        mesh = jax.make_mesh((len(devices),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        return cls(mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy batch -> global jax arrays sharded along 'data'."""
        return {name: jax.make_array_from_process_local_data(self.data, value)
                for name, value in local.items()}

    def local(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a 'data'-sharded global array."""
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, P("data")))

    def replicate(self, tree):
        """A pytree of host values (the same on every process) -> replicated global arrays."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), self.replicated, lambda index: np.asarray(x)[index]), tree)

    def jit_train_step(self):
        return jax.jit(train_step, donate_argnums=0,
                       in_shardings=(self.replicated, self.data, self.replicated, self.replicated),
                       out_shardings=(self.replicated, self.replicated))

    def jit_predict(self, apply_fn):
        return jax.jit(functools.partial(predict_probs, apply_fn),
                       in_shardings=(self.replicated, self.data), out_shardings=self.data)


def predict_split(par: Parallel, predict, params, x: np.ndarray, local_batch: int,
                  num_classes: int) -> np.ndarray:
    """(A, C) probabilities for this process's (A, k) atoms; all processes step together."""
    n_local = input_pipeline.num_batches(len(x), local_batch, drop_remainder=False)
    n_steps = _global_max(n_local)
    out = []
    batches = input_pipeline.eval_batches(x, None, local_batch)
    for _ in range(n_steps):
        batch = next(batches, None)
        if batch is None:  # this process is out of atoms; keep in step with the others
            batch = {"distances": np.ones((local_batch, x.shape[1]), np.float32)}
        probs = predict(params, par.global_batch({"distances": batch["distances"]})["distances"])
        out.append(par.local(probs))
    if not out:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(out)[:len(x)]


def split_metrics(probs: np.ndarray, split: Split, prepared: Prepared) -> tuple[dict, np.ndarray]:
    """Metrics over all processes' atoms of a split, plus its confusion matrix."""
    num_classes = len(prepared.symbols)
    cm, hits = evaluate.confusion_counts(split.y, probs, num_classes)
    p_true = probs[np.arange(len(split.y)), split.y] if len(split.y) else np.zeros(0)
    nll = _global_sum(np.array([-np.log(np.maximum(p_true, 1e-12)).sum()]))[0]
    cm, hits = _global_sum(cm), int(_global_sum(np.array([hits]))[0])
    metrics = evaluate.metrics_from_confusion(cm, hits, prepared.symbols)
    metrics["loss"] = float(nll / max(cm.sum(), 1))  # unweighted cross-entropy
    return metrics, cm


def monitor_metrics(probs: np.ndarray, prepared: Prepared) -> dict:
    """Validation loss, accuracy and balanced accuracy estimated from the per-element capped
    `prepared.monitor` atoms: per-class recall and cross-entropy are re-weighted by the full
    validation split's class frequencies, so the estimates are unbiased for the full split."""
    split, num_classes = prepared.monitor, len(prepared.symbols)
    cm, _ = evaluate.confusion_counts(split.y, probs, num_classes)
    p_true = probs[np.arange(len(split.y)), split.y]
    nll = np.bincount(split.y, weights=-np.log(np.maximum(p_true, 1e-12)), minlength=num_classes)
    cm, nll = _global_sum(cm), _global_sum(nll)
    n = cm.sum(axis=1)
    present = n > 0
    recall = np.divide(np.diag(cm), n, out=np.zeros(num_classes), where=present)
    freq = prepared.validation_support / max(prepared.validation_support.sum(), 1)
    return {"loss": float(np.sum(freq * np.divide(nll, n, out=np.zeros(num_classes),
                                                   where=present))),
            "accuracy": float(np.sum(freq * recall)),
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0}


# ----------------------------------------------------------------------------
# Checkpoints and the workdir.


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "history"))


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, history: list) -> None:
    mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))


def restore_checkpoint(mngr: ocp.CheckpointManager, target: TrainState,
                       step: int | None = None) -> tuple[TrainState, list]:
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
    return restored["state"], list(restored["history"] or [])


def run_config(config: Config, prepared: Prepared, num_params: int) -> dict:
    """config.json: the flags plus everything predict needs to rebuild the model."""
    return {
        "config": dataclasses.asdict(config),
        "elements_resolved": prepared.symbols,
        "atomic_numbers": prepared.element_list,
        "k": config.k,
        "model": config.model,
        "model_kwargs": config.model_kwargs(),
        "feature_mean": prepared.feature_mean,
        "feature_std": prepared.feature_std,
        "class_weights": prepared.class_weights.tolist(),
        "train_atoms_per_element": dict(zip(prepared.symbols, prepared.train_counts.tolist())),
        "num_params": num_params,
        **{f: getattr(config, f) for f in RUN_DEFINING
           if f not in ("elements_resolved", "model_kwargs")},
    }


def _check_same_run(workdir: str, new: dict) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    for field in RUN_DEFINING:
        if field in old and old[field] != new[field]:
            raise ConfigError(
                f"--workdir={workdir} holds a run with {field}={old[field]!r}, not "
                f"{new[field]!r}; use a new --workdir or the same flags to resume")


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@dataclasses.dataclass
class Trained:
    """A trained model read back from a workdir (what predict needs)."""

    run: dict  # config.json
    config: Config
    model: nn.Module
    params: Any
    step: int
    total_steps: int | None

    @property
    def symbols(self) -> list[str]:
        return list(self.run["elements_resolved"])

    @property
    def atomic_numbers(self) -> list[int]:
        return [int(z) for z in self.run["atomic_numbers"]]


def load_trained(workdir: str, step: int | None = None) -> Trained:
    """Model and parameters of the latest (or given) checkpoint in workdir.

    Raises ConfigError when the workdir holds no trained model.
    """
    path = os.path.join(workdir, "config.json")
    hint = f"train one with: python -m cryknn.main --workdir={workdir}"
    try:
        with open(path) as f:
            run = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no trained model in {workdir} ({path} not found); {hint}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in run["config"].items() if k in fields})
    model = build_model(config, len(run["elements_resolved"]), run.get("feature_mean"),
                        run.get("feature_std"))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {workdir}; {hint}")
    mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("state", "history"),
                                 options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"no checkpoints in {workdir}; {hint}")
    target = create_train_state(model, config, total_steps=1)  # structure only
    state, history = restore_checkpoint(mngr, target, step)
    mngr.close()
    total = history[-1]["step"] * config.epochs // history[-1]["epoch"] if history else None
    return Trained(run, config, model, state.params, int(state.step), total)


# ----------------------------------------------------------------------------
# The run.


def _sum_metrics(window: list) -> dict:
    return jax.tree.map(lambda *m: float(np.sum(m)), *jax.device_get(window))


@dataclasses.dataclass
class Run:
    """A model, its train state and the data-parallel machinery for one prepared data set."""

    config: Config
    prepared: Prepared
    par: Parallel
    model: nn.Module
    state: TrainState
    steps_per_epoch: int
    history: list

    @classmethod
    def create(cls, config: Config, prepared: Prepared) -> "Run":
        par = Parallel.create()
        local_batch = config.batch_size // jax.process_count()
        steps_per_epoch = _global_min(len(prepared.train.y) // local_batch)
        if steps_per_epoch < 1:
            raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                              f"{len(prepared.train.y)} selected training atoms")
        model = build_model(config, len(prepared.symbols), prepared.feature_mean,
                            prepared.feature_std)
        state = create_train_state(model, config, steps_per_epoch * config.epochs)
        return cls(config, prepared, par, model, par.replicate(state), steps_per_epoch, [])

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // jax.process_count()

    @functools.cached_property
    def predict(self):
        return self.par.jit_predict(self.model.apply)

    def probs(self, x: np.ndarray) -> np.ndarray:
        """(A, C) probabilities of this process's (A, k) atoms under the current params."""
        return predict_split(self.par, self.predict, self.state.params, x, self.local_batch,
                             len(self.prepared.symbols))

    def fit(self, mngr: ocp.CheckpointManager | None = None,
            log: Callable[[str], None] = _log, until_epoch: int | None = None) -> dict:
        """Train from the current step to the end of epoch `until_epoch` (default: the last),
        one validation estimate and checkpoint per epoch. Returns {'seconds', 'atoms'} of the
        training done here."""
        config, prepared, par = self.config, self.prepared, self.par
        end = self.steps_per_epoch * min(until_epoch or config.epochs, config.epochs)
        step_fn = par.jit_train_step()
        weights = par.replicate(jnp.asarray(prepared.class_weights))
        seed = par.replicate(np.int32(config.seed + 1))
        t_train = time.time()
        atoms = 0
        step = int(self.state.step)
        window, t_window = [], time.time()
        while step < end:
            epoch, start = divmod(step, self.steps_per_epoch)
            epoch_sums = []
            for local in input_pipeline.epoch_batches(
                    prepared.train.x, prepared.train.y, self.local_batch,
                    seed=config.seed + jax.process_index(), epoch=epoch, start=start):
                if step >= (epoch + 1) * self.steps_per_epoch:
                    break
                self.state, metrics = step_fn(self.state, par.global_batch(local), weights, seed)
                step += 1
                atoms += config.batch_size
                window.append(metrics)
                if step % config.log_every == 0 or step == self.total_steps:
                    sums = _sum_metrics(window)
                    epoch_sums.append(sums)
                    log(f"step {step}/{self.total_steps} epoch {epoch + 1}/{config.epochs} "
                        f"loss {sums['loss_sum'] / sums['count']:.4f} "
                        f"acc {sums['correct'] / sums['count']:.4f} "
                        f"{len(window) * config.batch_size / (time.time() - t_window):,.0f} "
                        f"atoms/s")
                    window, t_window = [], time.time()
            if window:
                epoch_sums.append(_sum_metrics(window))
                window = []
            t_val = time.time()
            val = monitor_metrics(self.probs(prepared.monitor.x), prepared)
            tot = jax.tree.map(lambda *m: sum(m), *epoch_sums)
            self.history.append({
                "epoch": epoch + 1, "step": step, "train_time_s": time.time() - t_train,
                "train_loss": tot["loss_sum"] / tot["count"],
                "train_accuracy": tot["correct"] / tot["count"],
                "validation_loss": val["loss"], "validation_accuracy": val["accuracy"],
                "validation_balanced_accuracy": val["balanced_accuracy"]})
            log(f"epoch {epoch + 1}: validation accuracy {val['accuracy']:.4f} balanced "
                f"{val['balanced_accuracy']:.4f} (estimated from {len(prepared.monitor.y)} "
                f"atoms, {time.time() - t_val:.1f} s)")
            if mngr is not None:
                save_checkpoint(mngr, self.state, self.history)
            t_window = time.time()
        if mngr is not None:
            mngr.wait_until_finished()
        return {"seconds": time.time() - t_train, "atoms": atoms}

    def evaluate(self, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
        """Full metrics of split `name` ('validation' or 'test') with the majority baseline;
        also returns this process's (A, C) probabilities and the (C, C) confusion matrix."""
        split = getattr(self.prepared, name)
        probs = self.probs(split.x)
        metrics, cm = split_metrics(probs, split, self.prepared)
        metrics["majority_baseline"] = evaluate.majority_baseline(self.prepared.train_counts, cm)
        return metrics, probs, cm


def train_and_evaluate(config: Config, workdir: str) -> dict:
    """Train `config.model` on the train split, checkpoint to workdir (resuming from the latest
    checkpoint there), evaluate on validation and test, and write the reports. Returns the
    metrics dict written to metrics.json."""
    t_start = time.time()
    validate(config)
    check_workdir(workdir)
    prepared = prepare_data(config)
    run = Run.create(config, prepared)
    num_params = models.param_count(run.state.params)
    run_json = run_config(config, prepared, num_params)
    _check_same_run(workdir, run_json)
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "config.json"), run_json)
    mngr = checkpoint_manager(workdir)
    if mngr.latest_step() is not None:
        run.state, run.history = restore_checkpoint(mngr, run.state)
        _log(f"resumed from {workdir}/checkpoints at step {int(run.state.step)}")
    _log(f"model {config.model}: {num_params:,} parameters; {len(prepared.train.y)} training "
         f"atoms, {run.steps_per_epoch} steps/epoch x {config.epochs} epochs, batch "
         f"{config.batch_size} on {jax.device_count()} device(s)")
    trained = run.fit(mngr)
    mngr.close()

    t_eval = time.time()
    results = {name: run.evaluate(name) for name in ("validation", "test")}
    eval_seconds = time.time() - t_eval
    _, test_probs, test_cm = results["test"]
    suffix = "" if jax.process_count() == 1 else f".p{jax.process_index()}"
    evaluate.write_misclassifications(
        os.path.join(workdir, f"misclassifications{suffix}.csv"),
        prepared.test.features.atom_structure_ids(), prepared.test.features.site_label,
        prepared.test.y, test_probs, prepared.symbols)
    metrics = {
        "test": results["test"][0],
        "validation": results["validation"][0],
        "majority_baseline": results["test"][0]["majority_baseline"],
        "elements": prepared.symbols,
        "flags": dataclasses.asdict(config),
        "num_params": num_params,
        "history": run.history,
        "timing": {
            "load_features_s": prepared.load_seconds,
            "train_s": trained["seconds"],
            "train_atoms_per_s": (trained["atoms"] / trained["seconds"]
                                  if trained["atoms"] else None),
            "evaluate_s": eval_seconds,
            "total_s": time.time() - t_start,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
        },
    }
    if jax.process_index() == 0:
        evaluate.plot_confusion(test_cm, prepared.symbols,
                                os.path.join(workdir, "confusion_matrix.png"),
                                title=f"{config.model}, k={config.k}, test split "
                                      f"(row-normalised)")
        if run.history:
            evaluate.plot_curves(run.history, os.path.join(workdir, "training_curves.png"))
        _write_json(os.path.join(workdir, "metrics.json"), metrics)
    t = metrics["test"]
    _log(f"test: accuracy {t['accuracy']:.4f}, balanced accuracy {t['balanced_accuracy']:.4f}, "
         f"top-3 {t['top3_accuracy']:.4f} (majority baseline accuracy "
         f"{metrics['majority_baseline']['accuracy']:.4f}); total "
         f"{metrics['timing']['total_s']:.0f} s; wrote {workdir}/metrics.json")
    return metrics
