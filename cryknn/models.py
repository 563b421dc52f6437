"""Element classifiers over k-nearest-neighbour distances (Flax linen).

Every model maps distances (B, k) float32 (sorted ascending, angstrom) to a dict:
  'logits': (B, C) unnormalised class scores, softmax gives p(element | distances);
  'stage1_logits': (B, C) only for the seed model, one sigmoid output per class.

Two models:
- `SeedModel` ('seed'): the original research's two-stage model, corrected. Stage 1 is a
  3 x 64 sigmoid MLP with one sigmoid output per class (one-vs-rest); stage 2 is a 3 x 128
  sigmoid MLP on [raw distances ++ stage-1 sigmoid outputs] with a softmax output. The
  original trained stage 1 first, froze it, then trained stage 2; here both stages train in
  the same steps, with a stop-gradient between them, so each stage still optimises only its
  own loss (stage 1: class-weighted binary cross-entropy; stage 2: class-weighted softmax
  cross-entropy) — see `train.loss_fn`.
- `MLPModel` ('mlp', the default): the distances standardised with training-set statistics
  (optionally first mapped to [1/d, log d, d[i+1] - d[i]]: `features='inverse_log_diff'`,
  which measured no better on validation at k = 5), then a pre-LayerNorm residual MLP with
  GELU and dropout, trained with AdamW and a cosine schedule like the seed model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODEL_NAMES = ("mlp", "seed")

# Distances below this are clipped before 1/d and log d (overlapping sites give d ~ 0).
MIN_DISTANCE = 0.1


FEATURE_MAPS = ("inverse_log_diff", "raw")


def feature_map(distances: jnp.ndarray, kind: str = "inverse_log_diff") -> jnp.ndarray:
    """(B, k) sorted distances -> model input features.

    'inverse_log_diff': (B, 3k - 1) [1/d, log d, d[1:] - d[:-1]]; 'raw': the distances.
    Works on numpy and jax arrays alike, so training statistics and the model share it.
    """
    if kind == "raw":
        return distances
    if kind != "inverse_log_diff":
        raise ValueError(f"unknown feature map {kind!r}")
    xp = np if isinstance(distances, np.ndarray) else jnp
    d = xp.maximum(distances, MIN_DISTANCE)
    parts = [1.0 / d, xp.log(d)]
    if d.shape[-1] > 1:
        parts.append(d[..., 1:] - d[..., :-1])
    return xp.concatenate(parts, axis=-1)


def feature_stats(distances: np.ndarray, kind: str = "inverse_log_diff",
                  sum_fn: Callable[[np.ndarray], np.ndarray] = np.asarray
                  ) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of `feature_map` over a (A, k) training set.

    sum_fn adds up per-process sums (multi-host: every process gets the same statistics).
    """
    f = feature_map(np.asarray(distances, np.float64), kind)
    moments = sum_fn(np.stack([np.full(f.shape[1], len(f), np.float64), f.sum(axis=0),
                               (f * f).sum(axis=0)]))
    n = np.maximum(moments[0], 1.0)
    mean = moments[1] / n
    std = np.sqrt(np.maximum(moments[2] / n - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return mean.tolist(), std.tolist()


class SeedModel(nn.Module):
    """Two-stage sigmoid MLP of the original research (corrected); input raw distances."""

    num_classes: int
    stage1_features: Sequence[int] = (64, 64, 64)
    stage2_features: Sequence[int] = (128, 128, 128)

    @nn.compact
    def __call__(self, distances: jnp.ndarray, *, train: bool = False) -> dict:
        del train  # no dropout in the original
        h = distances
        for i, width in enumerate(self.stage1_features):
            h = nn.sigmoid(nn.Dense(width, name=f"stage1_dense{i}")(h))
        stage1_logits = nn.Dense(self.num_classes, name="stage1_out")(h)
        # Stage 2 sees stage-1 probabilities as fixed inputs (the original froze stage 1).
        stage1_probs = jax.lax.stop_gradient(nn.sigmoid(stage1_logits))
        h = jnp.concatenate([distances, stage1_probs], axis=-1)
        for i, width in enumerate(self.stage2_features):
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
    """Residual MLP on standardised `feature_map` features (the default model).

    feature_mean / feature_std: (F,) statistics of `feature_map(distances, features)` on the
    training set (F = k for 'raw', 3k - 1 for 'inverse_log_diff'), stored in the workdir's
    config.json so predict applies the same scaling.
    """

    num_classes: int
    feature_mean: Sequence[float]
    feature_std: Sequence[float]
    width: int = 128
    depth: int = 2
    dropout: float = 0.1
    features: str = "raw"

    @nn.compact
    def __call__(self, distances: jnp.ndarray, *, train: bool = False) -> dict:
        f = feature_map(distances, self.features)
        f = (f - jnp.asarray(self.feature_mean, f.dtype)) / jnp.asarray(self.feature_std, f.dtype)
        x = nn.Dense(self.width, name="embed")(f)
        for i in range(self.depth):
            x = ResidualBlock(self.width, dropout=self.dropout, name=f"block{i}")(x, train=train)
        x = nn.gelu(nn.LayerNorm(name="final_norm")(x))
        return {"logits": nn.Dense(self.num_classes, name="head")(x)}


def create_model(name: str, num_classes: int, *, k: int, feature_mean=None, feature_std=None,
                 **kwargs) -> nn.Module:
    """Model by name ('mlp' or 'seed'). The mlp needs feature statistics of length 3k - 1."""
    if name == "seed":
        return SeedModel(num_classes=num_classes, **kwargs)
    if name == "mlp":
        if feature_mean is None or feature_std is None:
            kind = kwargs.get("features", "raw")
            num = feature_map(np.ones((1, k), np.float32), kind).shape[-1]
            feature_mean, feature_std = [0.0] * num, [1.0] * num
        return MLPModel(num_classes=num_classes, feature_mean=tuple(feature_mean),
                        feature_std=tuple(feature_std), **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def init_params(model: nn.Module, k: int, rng: jax.Array):
    """Parameters of `model` for inputs of k distances."""
    return model.init(rng, jnp.ones((1, k), jnp.float32), train=False)["params"]


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
