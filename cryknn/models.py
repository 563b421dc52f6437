"""Element classifiers over k-nearest-neighbour distances (Flax linen), and their registry.

Every model maps its inputs to a dict of outputs:
  'logits': (B, C) unnormalised class scores, softmax gives p(element | inputs);
  'stage1_logits': (B, C) only for the two-stage model, one sigmoid output per class.

Models (`--model`, `MODELS`: name -> class, the Config fields it is built from, what it reads):
- `two_stage` (`TwoStageModel`, the original research's two-stage model, corrected). Stage 1
  is a 3 x 64 sigmoid MLP with one sigmoid output per class (one-vs-rest); stage 2 is a
  3 x 128 sigmoid MLP on [raw distances ++ stage-1 sigmoid outputs] with a softmax output.
  The original trained stage 1 first, froze it, then trained stage 2; here both stages train
  in the same steps, with a stop-gradient between them, so each stage still optimises only
  its own loss (stage 1: class-weighted binary cross-entropy; stage 2: class-weighted
  softmax cross-entropy) — see `train.loss_fn`. Reads {'distances': (B, k) float32}.
- `mlp` (`MLPModel`): the distances standardised with training-set statistics
  (optionally first mapped to [1/d, log d, d[i+1] - d[i]]: `input_map='inverse_log_diff'`,
  which measured no better on validation at k = 5), then a pre-LayerNorm residual MLP with
  GELU and dropout. Reads {'distances': (B, k)}.
- `tree` (`TreeModel`, in `cryknn.message_passing` as the next): message passing over
  each atom's k-NN neighbourhood unrolled to depth `hops` on the host
  (`input_pipeline.gather_inputs`: 'neighbour_distances_<h>' (B, k**h, k), in masked-atom
  mode 'neighbour_elements_<h>' (B, k**h)); cost k**hops.
- `graph` (`GraphModel`): message passing over whole structures on the device
  (`graph_batch.GraphInputs`: packs of nodes, (N, k) neighbour slots, displacement vectors);
  every atom's state is computed once per hop, with optional directions (per-degree power
  spectra of each shell's harmonic moments, `cryknn.angular`); cost linear in k and hops.
Geometry only, unless `neighbour_elements` (masked-atom mode) also embeds the elements of
the neighbours (never the atom's own, nor those of the atom's own site).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cryknn import errors
# Re-exported: the registry below builds them, and scripts reach them as models.<name>.
from cryknn.message_passing import GraphModel, NeighbourhoodModel, TreeModel  # noqa: F401


class ModelSettings(Protocol):
    """The fields of `config.Config` that choose and shape a model (a Protocol: models
    need no import of the config module, which imports them lazily to validate)."""

    model: str
    k: int
    width: int | None
    depth: int
    dropout: float
    hops: int
    input_map: str
    neighbour_elements: bool
    directions: bool
    angular_channels: int
    element_states: bool


INPUT_MAPS = ("raw", "inverse_log_diff")

# Distances below this are clipped before 1/d and log d (overlapping sites give d ~ 0).
MIN_DISTANCE = 0.1


def map_inputs(distances, kind: str = "raw"):
    """(B, k) sorted distances -> model input features.

    'inverse_log_diff': (B, 3k - 1) [1/d, log d, d[1:] - d[:-1]]; 'raw': the distances.
    Works on numpy and jax arrays alike, so training statistics and the model share it.
    """
    if kind == "raw":
        return distances
    if kind != "inverse_log_diff":
        raise errors.ConfigError(f"unknown input map {kind!r}; choose one of "
                                 f"{', '.join(INPUT_MAPS)}")
    xp = np if isinstance(distances, np.ndarray) else jnp
    d = xp.maximum(distances, MIN_DISTANCE)
    parts = [1.0 / d, xp.log(d)]
    if d.shape[-1] > 1:
        parts.append(d[..., 1:] - d[..., :-1])
    return xp.concatenate(parts, axis=-1)


def input_statistics(distances: np.ndarray, kind: str = "raw",
                     sum_fn: Callable[[np.ndarray], np.ndarray] = np.asarray
                     ) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of `map_inputs` over a (A, k) training set.

    sum_fn adds up per-process sums (multi-host: every process gets the same statistics).
    """
    f = map_inputs(np.asarray(distances, np.float64), kind)
    moments = sum_fn(np.stack([np.full(f.shape[1], len(f), np.float64), f.sum(axis=0),
                               (f * f).sum(axis=0)]))
    n = np.maximum(moments[0], 1.0)
    mean = moments[1] / n
    std = np.sqrt(np.maximum(moments[2] / n - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return mean.tolist(), std.tolist()


class TwoStageModel(nn.Module):
    """Two-stage sigmoid MLP of the original research (its 'seed' model, corrected)."""

    num_classes: int
    stage1_widths: Sequence[int] = (64, 64, 64)
    stage2_widths: Sequence[int] = (128, 128, 128)

    @nn.compact
    def __call__(self, inputs: dict, *, train: bool = False) -> dict:
        del train  # no dropout in the original
        distances = inputs["distances"]
        h = distances
        for i, width in enumerate(self.stage1_widths):
            h = nn.sigmoid(nn.Dense(width, name=f"stage1_dense{i}")(h))
        stage1_logits = nn.Dense(self.num_classes, name="stage1_out")(h)
        # Stage 2 sees stage-1 probabilities as fixed inputs (the original froze stage 1).
        stage1_probs = jax.lax.stop_gradient(nn.sigmoid(stage1_logits))
        h = jnp.concatenate([distances, stage1_probs], axis=-1)
        for i, width in enumerate(self.stage2_widths):
            h = nn.sigmoid(nn.Dense(width, name=f"stage2_dense{i}")(h))
        logits = nn.Dense(self.num_classes, name="stage2_out")(h)
        return {"logits": logits, "stage1_logits": stage1_logits}


class ResidualBlock(nn.Module):
    """x + Dropout(Dense(GELU(Dense(LayerNorm(x)))))."""

    width: int
    expansion: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(self.width * self.expansion)(y))
        y = nn.Dense(self.width)(y)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + y


class MLPModel(nn.Module):
    """Residual MLP on standardised `input_map` features of the atom's own distances.

    input_mean / input_std: (F,) statistics of `map_inputs(distances, input_map)` on the
    training set (F = k for 'raw', 3k - 1 for 'inverse_log_diff'), stored with the trained
    model so prediction applies the same scaling.
    """

    num_classes: int
    input_mean: Sequence[float]
    input_std: Sequence[float]
    width: int = 128
    depth: int = 2
    dropout: float = 0.1
    input_map: str = "raw"

    @nn.compact
    def __call__(self, inputs: dict, *, train: bool = False) -> dict:
        f = map_inputs(inputs["distances"], self.input_map)
        f = (f - jnp.asarray(self.input_mean, f.dtype)) / jnp.asarray(self.input_std, f.dtype)
        x = nn.Dense(self.width, name="embed")(f)
        for i in range(self.depth):
            x = ResidualBlock(self.width, dropout=self.dropout, name=f"block{i}")(x, train=train)
        x = nn.gelu(nn.LayerNorm(name="final_norm")(x))
        return {"logits": nn.Dense(self.num_classes, name="head")(x)}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """What `--model=<name>` builds and reads.

    fields: the Config fields its architecture is built from (its hyperparameters).
    reads: 'atoms' (each atom's own k distances), 'tree' (each atom's neighbourhood
      unrolled on the host: `input_pipeline.gather_inputs`) or 'graph' (whole structures
      on the device: `graph_batch.GraphInputs`).
    """

    cls: type
    fields: tuple[str, ...]
    reads: str

    @property
    def standardises_inputs(self) -> bool:
        return "input_mean" in self.cls.__dataclass_fields__


MODELS = {
    "graph": ModelKind(GraphModel, ("width", "hops", "dropout", "neighbour_elements",
                                    "directions", "angular_channels", "element_states"),
                       "graph"),
    "mlp": ModelKind(MLPModel, ("width", "depth", "dropout", "input_map"), "atoms"),
    "two_stage": ModelKind(TwoStageModel, (), "atoms"),
    "tree": ModelKind(TreeModel, ("width", "hops", "dropout", "neighbour_elements"), "tree"),
}
MODEL_NAMES = tuple(MODELS)


def kind_of(config: ModelSettings) -> ModelKind:
    check_model_config(config)
    return MODELS[config.model]


def hyperparameters(config: ModelSettings) -> dict:
    """The configuration fields the chosen model is built from (its architecture)."""
    kind = kind_of(config)
    return {name: getattr(config, name) for name in kind.fields}


def check_model_config(config: ModelSettings) -> None:
    """Raise ConfigError for a model name or model hyperparameter that cannot work."""
    if config.model == "seed":  # the research's name for it; `seed` is the random seed here
        raise errors.ConfigError("--model=seed is called --model=two_stage (--seed is the "
                                 "random seed)")
    if config.model not in MODELS:
        raise errors.ConfigError(f"--model must be one of {', '.join(MODEL_NAMES)}, "
                                 f"got {config.model!r}")
    fields = MODELS[config.model].fields
    if "input_map" in fields and config.input_map not in INPUT_MAPS:
        raise errors.ConfigError(f"--input_map must be one of {', '.join(INPUT_MAPS)}, got "
                                 f"{config.input_map!r}")
    if "width" in fields:
        if (config.width is not None and config.width < 1) or config.depth < 0:
            raise errors.ConfigError("--width must be >= 1 and --depth >= 0")
        if not 0 <= config.dropout < 1:
            raise errors.ConfigError(f"--dropout must be in [0, 1), got {config.dropout}")
    if "angular_channels" in fields and config.angular_channels < 1:
        raise errors.ConfigError(f"--angular_channels must be >= 1, got "
                                 f"{config.angular_channels}")
    if "hops" in fields and not 1 <= config.hops <= 4:
        raise errors.ConfigError(f"--hops must be 1 to 4, got {config.hops}")
    if config.neighbour_elements and "neighbour_elements" not in fields:
        raise errors.ConfigError("--neighbour_elements needs --model=graph (or tree)")
    if config.element_states and not ("element_states" in fields
                                      and config.neighbour_elements):
        raise errors.ConfigError("--element_states needs --model=graph --neighbour_elements")


def needs_input_statistics(config: ModelSettings) -> bool:
    return kind_of(config).standardises_inputs


def create_model(config: ModelSettings, num_classes: int,
                 input_stats: tuple | None = None) -> nn.Module:
    """The model `config.model` for num_classes classes.

    input_stats: (mean, std) of the model's input features (the mlp's, or every graph
    node's k distances) on the training set
    (`input_statistics`); identity scaling when None (tests, structure-only uses).
    """
    kind = kind_of(config)
    kwargs = hyperparameters(config)
    if not kind.standardises_inputs:
        return kind.cls(num_classes=num_classes, **kwargs)
    if input_stats is None:
        num = map_inputs(np.ones((1, config.k), np.float32), _input_map_of(config)).shape[-1]
        input_stats = ([0.0] * num, [1.0] * num)
    mean, std = input_stats
    return kind.cls(num_classes=num_classes, input_mean=tuple(mean), input_std=tuple(std),
                    **kwargs)


def split_input_statistics(model: nn.Module) -> tuple[nn.Module, tuple | None]:
    """(template, (mean, std)): the model with empty input statistics, and its statistics
    (None for a model without them). Models trained alike on differently capped atoms
    differ only in these, so their templates compare equal: an ensemble's members share
    one traced forward pass and one parameter-shape check."""
    if "input_mean" not in type(model).__dataclass_fields__:
        return model, None
    return model.clone(input_mean=(), input_std=()), (model.input_mean, model.input_std)


def _input_map_of(config: ModelSettings) -> str:
    return config.input_map if "input_map" in MODELS[config.model].fields else "raw"


def input_statistics_of(config: ModelSettings, distances: np.ndarray,
                        sum_fn: Callable[[np.ndarray], np.ndarray] = np.asarray):
    """The model's input statistics from (A, k) training distances (None if it needs none)."""
    if not needs_input_statistics(config):
        return None
    return input_statistics(distances, _input_map_of(config), sum_fn=sum_fn)


def init_params(model: nn.Module, k: int, rng: jax.Array, inputs: dict | None = None) -> Any:
    """Parameters of `model`, from example inputs (default: k distances, enough for the
    models that read only an atom's own distances)."""
    if inputs is None:
        inputs = {"distances": jnp.ones((1, k), jnp.float32)}
    # One compiled program: op-by-op initialisation is several times slower to dispatch.
    return jax.jit(lambda key, x: model.init(key, x, train=False))(rng, inputs)["params"]


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
