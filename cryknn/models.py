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
- `tree` (`TreeModel`): message passing over each atom's k-NN neighbourhood unrolled to
  depth `hops` on the host (`input_pipeline.gather_inputs`: 'neighbour_distances_<h>'
  (B, k**h, k), in masked-atom mode 'neighbour_elements_<h>' (B, k**h)); cost k**hops.
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

from cryknn import angular
from cryknn import errors


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


def radial_basis(d: jnp.ndarray, num: int, d_max: float) -> jnp.ndarray:
    """(..., num) Gaussian expansion of distances d (...,) on num centres in [0, d_max]."""
    centres = jnp.linspace(0.0, d_max, num, dtype=d.dtype)
    width = d_max / num
    return jnp.exp(-0.5 * ((d[..., None] - centres) / width) ** 2)


def layer_norm(x: jnp.ndarray, name: str) -> jnp.ndarray:
    """nn.LayerNorm `name` over the last axis of x (..., C), applied to x as (rows, C).

    Same parameters and values as on x itself; flat because XLA's CPU backend sums the
    scale and bias gradients over leading axes (1, N) about 10x slower than over one axis
    of N (a pack of 4,096 nodes by 192 channels: 10.8 ms against 0.74 ms forward and
    backward; experiments/bench_layer_norm.py), and a graph batch on one device has one
    pack."""
    return nn.LayerNorm(name=name)(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class Interaction(nn.Module):
    """One round of message passing from k children to each parent node.

    message_j = Dense(h_child_j) * filter(d_j), filter a small MLP of the radial basis of
    the edge distance (a continuous convolution); the parent sums its children's messages
    (invariant to their order) and updates its embedding through a residual MLP.
    """

    width: int
    num_rbf: int = 24
    d_max: float = 6.0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, parent: jnp.ndarray, children: jnp.ndarray, edges: jnp.ndarray, *,
                 train: bool) -> jnp.ndarray:
        """parent (B, n, W), children (B, n * k, W), edges (B, n, k) -> (B, n, W)."""
        batch, n, k = edges.shape
        rbf = radial_basis(edges, self.num_rbf, self.d_max)  # (B, n, k, R)
        filt = nn.Dense(self.width, name="filter_out")(
            nn.gelu(nn.Dense(self.width, name="filter_in")(rbf)))
        messages = nn.Dense(self.width, name="message")(children).reshape(
            batch, n, k, self.width) * filt
        pooled = messages.sum(axis=2) / k
        y = layer_norm(jnp.concatenate([parent, pooled], axis=-1), "norm")
        y = nn.Dense(self.width, name="update_out")(
            nn.gelu(nn.Dense(2 * self.width, name="update_in")(y)))
        return parent + nn.Dropout(self.dropout, deterministic=not train)(y)


class NeighbourhoodModel(nn.Module):
    """The fields both message-passing models share.

    input_mean / input_std: (k,) statistics of the training atoms' own distances; every
    node's k distances are standardised with them.
    """

    num_classes: int
    input_mean: Sequence[float]
    input_std: Sequence[float]
    hops: int = 2
    width: int = 64
    dropout: float = 0.1
    neighbour_elements: bool = False


class TreeModel(NeighbourhoodModel):
    """Message passing over each atom's k-NN tree, unrolled to depth `hops` on the host
    (the graph model before cryknn 0.3; the baseline of experiments/bench_model.py)."""

    @nn.compact
    def __call__(self, inputs: dict, *, train: bool = False) -> dict:
        own = inputs["distances"]
        rows = [own[:, None, :]] + [inputs[f"neighbour_distances_{h}"]
                                    for h in range(1, self.hops + 1)]  # (B, k**h, k)
        mean = jnp.asarray(self.input_mean, own.dtype)
        std = jnp.asarray(self.input_std, own.dtype)
        encode_in = nn.Dense(self.width, name="encode_in")
        encode_out = nn.Dense(self.width, name="encode_out")
        nodes = [encode_out(nn.gelu(encode_in((r - mean) / std))) for r in rows]
        if self.neighbour_elements:
            embed = nn.Embed(elements_count(), self.width, name="element_embedding")
            for h in range(1, self.hops + 1):
                nodes[h] = nodes[h] + embed(inputs[f"neighbour_elements_{h}"])
        for r in range(self.hops):
            interact = Interaction(self.width, dropout=self.dropout, name=f"round{r}")
            nodes = [interact(nodes[h], nodes[h + 1], rows[h], train=train)
                     for h in range(self.hops - r)]
        x = nn.gelu(nn.LayerNorm(name="final_norm")(nodes[0][:, 0]))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return {"logits": nn.Dense(self.num_classes, name="head")(x)}


# ----------------------------------------------------------------------------
# The graph model: message passing over whole structures on the device.


def gather_nodes(values: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """values (G, N, ...) per node, index (G, N, k, ...) slots in the same pack ->
    (G, N, k, ..., ...) the values of the indexed nodes (a gather on the device)."""
    return jax.vmap(lambda v, i: v[i])(values, index)


class GraphLayer(nn.Module):
    """One round of message passing over the pack, each node's state computed once.

    message_ij = Dense(h_j) * filter(edge_ij) (a continuous convolution); the node reads the
    mean message (order invariant) and, with directions, the power spectrum of the harmonic
    moments A_i = mean_j a_ij Y(u_ij) (degrees 1..degree) of `angular_channels` narrower
    messages a_ij: the shape of the shell (linear, planar, tetrahedral, octahedral ...),
    weighted by what each neighbour is, not only its radii. The spectrum is computed from
    pairs of directions (`angular.power_spectra`), without the harmonics themselves.
    """

    width: int
    angular_channels: int = 16
    dropout: float = 0.0

    @nn.compact
    def __call__(self, h, index, edge_features, kernels, *, train: bool):
        """h (G, N, W), index (G, N, k), edge_features (G, N, k, E), kernels (G, N, L, P)
        of `angular.pair_kernels` (degrees 1..degree) divided by k**2 (the moments are
        means over the k neighbours), or None -> (G, N, W)."""
        width = self.width + (self.angular_channels if kernels is not None else 0)
        # One gather and one filter serve the radial and the angular messages.
        messages = gather_nodes(nn.Dense(width, name="message")(h), index)
        messages = messages * nn.Dense(width, name="filter")(edge_features)
        # Mean before slicing: the slice then copies (G, N, W), not (G, N, k, W).
        parts = [h, messages.mean(axis=-2)[..., :self.width]]
        if kernels is not None:
            a = messages[..., self.width:]  # (G, N, k, A)
            parts.append(angular.power_spectra(kernels, a))
        y = layer_norm(jnp.concatenate(parts, axis=-1), "norm")
        y = nn.Dense(self.width, name="update_out")(
            nn.gelu(nn.Dense(self.width, name="update_in")(y)))
        return h + nn.Dropout(self.dropout, deterministic=not train)(y)


class ElementContext(nn.Module):
    """Masked-atom mode: what a node may know of the elements around it.

    The elements of its neighbours (first shell) and of their neighbours (second shell),
    each filtered by its edge's distance; every atom of the node's own site (its symmetry
    copies and images) reads as element 0 (unknown). Geometry states never see elements,
    so nothing carries an atom's own element back to it.
    """

    width: int

    @nn.compact
    def __call__(self, inputs, index, edge_features):
        """-> (G, N, W) element context of every node."""
        site = inputs.site
        own = site[..., None]
        first_site = gather_nodes(site, index)  # (G, N, k)
        first = jnp.where(first_site == own, 0, gather_nodes(inputs.elements, index))
        second_index = gather_nodes(index, index)  # (G, N, k, k)
        second_site = gather_nodes(site, second_index)
        second = jnp.where(second_site == own[..., None], 0,
                           gather_nodes(inputs.elements, second_index))
        embed = nn.Embed(elements_count(), self.width, name="element_embedding")
        edge_filter = nn.Dense(self.width, name="element_filter")(edge_features)
        second_filter = gather_nodes(edge_filter, index)  # (G, N, k, k, W): edge j -> l
        shell2 = (embed(second) * second_filter).mean(axis=-2)
        pair = embed(first) + nn.Dense(self.width, name="second_shell")(shell2)
        return (pair * edge_filter).mean(axis=-2)


class GraphModel(NeighbourhoodModel):
    """Message passing over whole structures (`graph_batch.GraphInputs`, G packs of N
    nodes), every gather on the device.

    Each node starts from its standardised k distances (input_mean / input_std: (k,)
    training statistics); `hops` `GraphLayer`s refine it from its k neighbours' states
    (with `directions`, from the shape of its shell too); a head predicts its element.
    Outputs {'logits': (G, N, C)}. In masked-atom mode (`neighbour_elements`) the head also
    reads the node's `ElementContext`, never its own element.
    """

    directions: bool = True
    angular_channels: int = 16
    degree: int = angular.MAX_DEGREE
    num_rbf: int = 24
    edge_width: int = 16
    d_max: float = 6.0

    @nn.compact
    def __call__(self, inputs, *, train: bool = False) -> dict:
        d = inputs.distances
        mean = jnp.asarray(self.input_mean, d.dtype)
        std = jnp.asarray(self.input_std, d.dtype)
        h = nn.Dense(self.width, name="encode_out")(
            nn.gelu(nn.Dense(self.width, name="encode_in")((d - mean) / std)))
        edges = nn.gelu(nn.Dense(self.edge_width, name="edge_embed")(
            radial_basis(d, self.num_rbf, self.d_max)))  # (G, N, k, E)
        k = d.shape[-1]
        kernels = (angular.pair_kernels(inputs.vectors, self.degree, first=1) / (k * k)
                   if self.directions else None)  # geometry only: once for every layer
        for r in range(self.hops):
            h = GraphLayer(self.width, self.angular_channels,
                           dropout=self.dropout, name=f"layer{r}")(
                h, inputs.neighbour_index, edges, kernels, train=train)
        if self.neighbour_elements:
            context = ElementContext(self.width, name="elements")(
                inputs, inputs.neighbour_index, edges)
            h = h + nn.Dense(self.width, name="context")(nn.gelu(context))
        x = nn.gelu(layer_norm(h, "final_norm"))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return {"logits": nn.Dense(self.num_classes, name="head")(x)}


def elements_count() -> int:
    """Rows of the element embedding: atomic numbers 0..118 (0 unused)."""
    return 119


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
                                    "directions", "angular_channels"), "graph"),
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
