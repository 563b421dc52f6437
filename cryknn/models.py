"""Element classifiers over k-nearest-neighbour distances (Flax linen).

Every model maps a dict of inputs ({'distances': (B, k) float32, sorted ascending,
angstrom}) to a dict of outputs:
  'logits': (B, C) unnormalised class scores, softmax gives p(element | inputs);
  'stage1_logits': (B, C) only for the two-stage model, one sigmoid output per class.

Models (`--model`):
- `two_stage` (`TwoStageModel`, the original research's 'seed' model, corrected). Stage 1
  is a 3 x 64 sigmoid MLP with one sigmoid output per class (one-vs-rest); stage 2 is a
  3 x 128 sigmoid MLP on [raw distances ++ stage-1 sigmoid outputs] with a softmax output.
  The original trained stage 1 first, froze it, then trained stage 2; here both stages train
  in the same steps, with a stop-gradient between them, so each stage still optimises only
  its own loss (stage 1: class-weighted binary cross-entropy; stage 2: class-weighted
  softmax cross-entropy) — see `train.loss_fn`.
- `mlp` (`MLPModel`, the default): the distances standardised with training-set statistics
  (optionally first mapped to [1/d, log d, d[i+1] - d[i]]: `input_map='inverse_log_diff'`,
  which measured no better on validation at k = 5), then a pre-LayerNorm residual MLP with
  GELU and dropout, trained with AdamW and a cosine schedule like the two-stage model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cryknn import errors

MODEL_NAMES = ("mlp", "two_stage")
INPUT_MAPS = ("raw", "inverse_log_diff")

# Distances below this are clipped before 1/d and log d (overlapping sites give d ~ 0).
MIN_DISTANCE = 0.1


def input_map(distances, kind: str = "raw"):
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
    """Mean and standard deviation of `input_map` over a (A, k) training set.

    sum_fn adds up per-process sums (multi-host: every process gets the same statistics).
    """
    f = input_map(np.asarray(distances, np.float64), kind)
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
    """Residual MLP on standardised `input_map` features (the default model).

    input_mean / input_std: (F,) statistics of `input_map(distances, input_map)` on the
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
        f = input_map(inputs["distances"], self.input_map)
        f = (f - jnp.asarray(self.input_mean, f.dtype)) / jnp.asarray(self.input_std, f.dtype)
        x = nn.Dense(self.width, name="embed")(f)
        for i in range(self.depth):
            x = ResidualBlock(self.width, dropout=self.dropout, name=f"block{i}")(x, train=train)
        x = nn.gelu(nn.LayerNorm(name="final_norm")(x))
        return {"logits": nn.Dense(self.num_classes, name="head")(x)}


def hyperparameters(config: Any) -> dict:
    """The configuration fields the chosen model is built from (its architecture)."""
    if config.model == "mlp":
        return {"width": config.width, "depth": config.depth, "dropout": config.dropout,
                "input_map": config.input_map}
    return {}


def check_model_config(config: Any) -> None:
    """Raise ConfigError for a model name or model hyperparameter that cannot work."""
    if config.model not in MODEL_NAMES:
        raise errors.ConfigError(f"--model must be one of {', '.join(MODEL_NAMES)} (or seed), "
                                 f"got {config.model!r}")
    if config.model == "mlp":
        if config.input_map not in INPUT_MAPS:
            raise errors.ConfigError(f"--input_map must be one of {', '.join(INPUT_MAPS)}, got "
                                     f"{config.input_map!r}")
        if config.width < 1 or config.depth < 0:
            raise errors.ConfigError("--width must be >= 1 and --depth >= 0")
        if not 0 <= config.dropout < 1:
            raise errors.ConfigError(f"--dropout must be in [0, 1), got {config.dropout}")


def needs_input_statistics(config: Any) -> bool:
    return config.model == "mlp"


def create_model(config: Any, num_classes: int, input_stats: tuple | None = None) -> nn.Module:
    """The model `config.model` for num_classes classes.

    input_stats: (mean, std) of the mlp's input features on the training set
    (`input_statistics`); identity scaling when None (tests, structure-only uses).
    """
    check_model_config(config)
    if config.model == "two_stage":
        return TwoStageModel(num_classes=num_classes)
    kwargs = hyperparameters(config)
    if input_stats is None:
        num = input_map(np.ones((1, config.k), np.float32), config.input_map).shape[-1]
        input_stats = ([0.0] * num, [1.0] * num)
    mean, std = input_stats
    return MLPModel(num_classes=num_classes, input_mean=tuple(mean), input_std=tuple(std),
                    **kwargs)


def example_inputs(k: int, batch: int = 1) -> dict:
    """Inputs of the right shapes for `init`."""
    return {"distances": jnp.ones((batch, k), jnp.float32)}


def init_params(model: nn.Module, k: int, rng: jax.Array) -> Any:
    """Parameters of `model` for inputs of k distances."""
    return model.init(rng, example_inputs(k), train=False)["params"]


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
