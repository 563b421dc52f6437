"""The message-passing models: `TreeModel` (each atom's k-NN tree unrolled to depth `hops`
on the host, `input_pipeline.gather_inputs`) and `GraphModel` (whole structures on the
device, `graph_batch.GraphInputs`), with their building blocks. Built through the registry
in `cryknn.models` (`create_model`); every model maps its inputs to {'logits': ...}.

Dense layers and norms run on flat rows (`on_rows`): XLA's CPU backend is several times
slower over leading axes of size 1 (experiments/bench_on_rows.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cryknn import angular


def elements_count() -> int:
    """Rows of the element embedding: atomic numbers 0..118 (0 unused)."""
    return 119


def radial_basis(d: jnp.ndarray, num: int, d_max: float) -> jnp.ndarray:
    """(..., num) Gaussian expansion of distances d (...,) on num centres in [0, d_max]."""
    centres = jnp.linspace(0.0, d_max, num, dtype=d.dtype)
    width = d_max / num
    return jnp.exp(-0.5 * ((d[..., None] - centres) / width) ** 2)


def on_rows(layer: Callable, x: jnp.ndarray) -> jnp.ndarray:
    """layer (a Dense, a LayerNorm: anything acting on the last axis) applied to x (..., C)
    as (rows, C): same parameters, same values. XLA's CPU backend runs these layers and
    their gradients over leading axes (1, N, ...) 2.6-15x slower than over one flat axis of
    rows (experiments/bench_on_rows.py); a graph batch on one device is one pack."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def dense(features: int, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """nn.Dense `name` on the last axis of x (..., C), run on flat rows (`on_rows`)."""
    return on_rows(nn.Dense(features, name=name), x)


def layer_norm(x: jnp.ndarray, name: str) -> jnp.ndarray:
    """nn.LayerNorm `name` over the last axis of x (..., C), run on flat rows (`on_rows`)."""
    return on_rows(nn.LayerNorm(name=name), x)


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
        filt = dense(self.width, "filter_out", nn.gelu(dense(self.width, "filter_in", rbf)))
        messages = dense(self.width, "message", children).reshape(
            batch, n, k, self.width) * filt
        pooled = messages.sum(axis=2) / k
        y = layer_norm(jnp.concatenate([parent, pooled], axis=-1), "norm")
        y = dense(self.width, "update_out", nn.gelu(dense(2 * self.width, "update_in", y)))
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
        nodes = [on_rows(encode_out, nn.gelu(on_rows(encode_in, (r - mean) / std)))
                 for r in rows]
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


def gather_nodes(values: jnp.ndarray, index: jnp.ndarray, packed: bool) -> jnp.ndarray:
    """values ([G,] N, ...) per node, index ([G,] N, k, ...) node slots in the same pack ->
    ([G,] N, k, ..., ...) the values of the indexed nodes (a gather on the device). With a
    pack axis (`packed`) the gather runs per pack, so that a batch sharded over packs
    gathers on each device without communication."""
    return jax.vmap(lambda v, i: v[i])(values, index) if packed else values[index]


class GraphLayer(nn.Module):
    """One round of message passing over the nodes, each node's state computed once.

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
    def __call__(self, h, index, edge_features, kernels, *, train: bool, packed: bool):
        """h ([G,] N, W), index ([G,] N, k), edge_features ([G,] N, k, E), kernels
        ([G,] N, L, P) of `angular.pair_kernels` (degrees 1..degree) divided by k**2 (the
        moments are means over the k neighbours), or None -> ([G,] N, W); the pack axis G
        only where `packed` (`gather_nodes`)."""
        width = self.width + (self.angular_channels if kernels is not None else 0)
        # One gather and one filter serve the radial and the angular messages.
        messages = gather_nodes(dense(width, "message", h), index, packed)
        messages = messages * dense(width, "filter", edge_features)
        # Mean before slicing: the slice then copies ([G,] N, W), not ([G,] N, k, W).
        parts = [h, messages.mean(axis=-2)[..., :self.width]]
        if kernels is not None:
            a = messages[..., self.width:]  # ([G,] N, k, A)
            parts.append(angular.power_spectra(kernels, a))
        y = layer_norm(jnp.concatenate(parts, axis=-1), "norm")
        y = dense(self.width, "update_out", nn.gelu(dense(self.width, "update_in", y)))
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
    def __call__(self, inputs, index, edge_features, states=None, *, packed: bool):
        """index ([G,] N, k), edge_features ([G,] N, k, E), states ([G,] N, W) geometry
        states or None -> ([G,] N, W) element context of every node (the pack axis G only
        where `packed`). With states, each neighbour's element terms and its geometry
        state pass a small MLP together; states carry no element, so nothing leaks."""
        site = inputs.site
        own = site[..., None]
        gather = lambda values, at: gather_nodes(values, at, packed)  # noqa: E731
        first = jnp.where(gather(site, index) == own, 0, gather(inputs.elements, index))
        second_index = gather(index, index)  # ([G,] N, k, k)
        second = jnp.where(gather(site, second_index) == own[..., None], 0,
                           gather(inputs.elements, second_index))
        embed = nn.Embed(elements_count(), self.width, name="element_embedding")
        edge_filter = dense(self.width, "element_filter", edge_features)  # ([G,] N, k, W)
        second_filter = gather(edge_filter, index)  # ([G,] N, k, k, W): edge j -> l
        shell2 = (embed(second) * second_filter).mean(axis=-2)
        pair = embed(first) + dense(self.width, "second_shell", shell2)
        if states is not None:
            pair = jnp.concatenate([pair, gather(states, index)], axis=-1)
            pair = dense(self.width, "pair_out", nn.gelu(dense(self.width, "pair_in", pair)))
        return (pair * edge_filter).mean(axis=-2)


class GraphModel(NeighbourhoodModel):
    """Message passing over whole structures (`graph_batch.GraphInputs`, G packs of N
    nodes), every gather on the device, dense layers on flat rows (`on_rows`).

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
    element_states: bool = False

    @nn.compact
    def __call__(self, inputs, *, train: bool = False) -> dict:
        # One pack (a batch on one device) runs without its pack axis: XLA's CPU backend
        # splits loops over their outermost axis between cores, so an outer axis of 1 runs
        # on one core (and dense layers, norms and gathers several times slower,
        # experiments/bench_on_rows.py). Several packs keep it: a batch sharded over packs
        # then gathers locally on each device.
        packed = inputs.distances.shape[0] > 1
        if not packed:
            inputs = jax.tree.map(lambda x: x[0], inputs)
        d = inputs.distances
        mean = jnp.asarray(self.input_mean, d.dtype)
        std = jnp.asarray(self.input_std, d.dtype)
        h = dense(self.width, "encode_out", nn.gelu(dense(self.width, "encode_in",
                                                           (d - mean) / std)))
        edges = nn.gelu(dense(self.edge_width, "edge_embed",
                              radial_basis(d, self.num_rbf, self.d_max)))  # ([G,] N, k, E)
        k = d.shape[-1]
        kernels = (angular.pair_kernels(inputs.vectors, self.degree, first=1) / (k * k)
                   if self.directions else None)  # geometry only: once for every layer
        for r in range(self.hops):
            h = GraphLayer(self.width, self.angular_channels,
                           dropout=self.dropout, name=f"layer{r}")(
                h, inputs.neighbour_index, edges, kernels, train=train, packed=packed)
        if self.neighbour_elements:
            context = ElementContext(self.width, name="elements")(
                inputs, inputs.neighbour_index, edges, h if self.element_states else None,
                packed=packed)
            h = h + dense(self.width, "context", nn.gelu(context))
        x = nn.gelu(layer_norm(h, "final_norm"))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = dense(self.num_classes, "head", x)
        return {"logits": logits if packed else logits[None]}
