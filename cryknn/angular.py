"""Rotation-invariant descriptions of a set of directions: real spherical harmonics up to
degree 4 and their per-degree power spectra, what the graph model's directions are built
from (`message_passing.GraphLayer`). Pure jax.numpy functions, shapes in the docstrings.

The model computes the power spectra without harmonics: by the addition theorem,
sum_m Y_lm(u) Y_lm(v) = (2l + 1) / (4 pi) P_l(u . v), so the power spectrum of weighted
moments sum_j w_j Y_lm(u_j) is a quadratic form of the weights over pairs of directions
(`pair_kernels`, `power_spectra`): the same numbers, with the angular part's forward and
backward pass several times faster on a CPU (the whole training step ~15 %;
experiments/bench_model.py). `spherical_harmonics` and `angular_invariants` are the
definition the pair form is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Real spherical harmonics up to degree 4 as polynomials of a unit vector (x, y, z); each
# degree's block is orthonormal on the sphere, so its squared norm is rotation invariant.
_SQ = np.sqrt
_HARMONICS = (
    (lambda x, y, z: 0.5 * _SQ(1 / np.pi) + 0 * x,),
    (lambda x, y, z: _SQ(3 / (4 * np.pi)) * y, lambda x, y, z: _SQ(3 / (4 * np.pi)) * z,
     lambda x, y, z: _SQ(3 / (4 * np.pi)) * x),
    (lambda x, y, z: 0.5 * _SQ(15 / np.pi) * x * y,
     lambda x, y, z: 0.5 * _SQ(15 / np.pi) * y * z,
     lambda x, y, z: 0.25 * _SQ(5 / np.pi) * (3 * z * z - 1),
     lambda x, y, z: 0.5 * _SQ(15 / np.pi) * x * z,
     lambda x, y, z: 0.25 * _SQ(15 / np.pi) * (x * x - y * y)),
    (lambda x, y, z: 0.25 * _SQ(35 / (2 * np.pi)) * y * (3 * x * x - y * y),
     lambda x, y, z: 0.5 * _SQ(105 / np.pi) * x * y * z,
     lambda x, y, z: 0.25 * _SQ(21 / (2 * np.pi)) * y * (5 * z * z - 1),
     lambda x, y, z: 0.25 * _SQ(7 / np.pi) * z * (5 * z * z - 3),
     lambda x, y, z: 0.25 * _SQ(21 / (2 * np.pi)) * x * (5 * z * z - 1),
     lambda x, y, z: 0.25 * _SQ(105 / np.pi) * z * (x * x - y * y),
     lambda x, y, z: 0.25 * _SQ(35 / (2 * np.pi)) * x * (x * x - 3 * y * y)),
    (lambda x, y, z: 0.75 * _SQ(35 / np.pi) * x * y * (x * x - y * y),
     lambda x, y, z: 0.75 * _SQ(35 / (2 * np.pi)) * y * z * (3 * x * x - y * y),
     lambda x, y, z: 0.75 * _SQ(5 / np.pi) * x * y * (7 * z * z - 1),
     lambda x, y, z: 0.75 * _SQ(5 / (2 * np.pi)) * y * z * (7 * z * z - 3),
     lambda x, y, z: 3 / 16 * _SQ(1 / np.pi) * (35 * z ** 4 - 30 * z * z + 3),
     lambda x, y, z: 0.75 * _SQ(5 / (2 * np.pi)) * x * z * (7 * z * z - 3),
     lambda x, y, z: 3 / 8 * _SQ(5 / np.pi) * (x * x - y * y) * (7 * z * z - 1),
     lambda x, y, z: 0.75 * _SQ(35 / (2 * np.pi)) * x * z * (x * x - 3 * y * y),
     lambda x, y, z: 3 / 16 * _SQ(35 / np.pi) * (x * x * (x * x - 3 * y * y)
                                                 - y * y * (3 * x * x - y * y))),
)
MAX_DEGREE = len(_HARMONICS) - 1


def spherical_harmonics(vectors: jnp.ndarray, degree: int) -> jnp.ndarray:
    """(..., 3) vectors -> (..., (degree + 1)**2) real spherical harmonics of their
    directions, degrees 0..degree in order (zero vectors give the direction +x)."""
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    unit = jnp.where(norm > 1e-6, vectors / jnp.maximum(norm, 1e-6),
                     jnp.asarray([1.0, 0.0, 0.0], vectors.dtype))
    x, y, z = unit[..., 0], unit[..., 1], unit[..., 2]
    return jnp.stack([f(x, y, z) for block in _HARMONICS[:degree + 1] for f in block],
                     axis=-1).astype(vectors.dtype)


def angular_invariants(moments: jnp.ndarray, degree: int, first: int = 0) -> jnp.ndarray:
    """(..., (degree + 1)**2 - first**2, W) per-channel harmonic moments of degrees
    first..degree -> (..., (degree + 1 - first) * W): the squared norm of each degree's
    block per channel (its power spectrum), invariant under rotations of the
    neighbourhood."""
    offset = first * first
    blocks = [jnp.sum(moments[..., l * l - offset:(l + 1) ** 2 - offset, :] ** 2, axis=-2)
              for l in range(first, degree + 1)]
    return jnp.concatenate(blocks, axis=-1)


def _unit(vectors: jnp.ndarray) -> jnp.ndarray:
    """(..., 3) -> (..., 3) unit vectors (zero vectors give +x, as in spherical_harmonics)."""
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return jnp.where(norm > 1e-6, vectors / jnp.maximum(norm, 1e-6),
                     jnp.asarray([1.0, 0.0, 0.0], vectors.dtype))


def legendre(x: jnp.ndarray, degree: int) -> list[jnp.ndarray]:
    """Legendre polynomials P_0..P_degree of x (...,), by Bonnet's recursion."""
    out = [jnp.ones_like(x), x]
    for n in range(1, degree):
        out.append(((2 * n + 1) * x * out[n] - n * out[n - 1]) / (n + 1))
    return out[:degree + 1]


def pair_indices(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k (k + 1) / 2 unordered pairs (j <= j') of k neighbours, as two index arrays."""
    return np.triu_indices(k)


def pair_kernels(vectors: jnp.ndarray, degree: int, first: int = 1) -> jnp.ndarray:
    """(..., k, 3) directions -> (..., degree + 1 - first, k (k + 1) / 2): for each degree
    l = first..degree and pair (j <= j', `pair_indices`), sum_m Y_lm(u_j) Y_lm(u_j') =
    (2l + 1) / (4 pi) P_l(u_j . u_j'), doubled for j != j' (the pair counted both ways).
    Depends on geometry only: computed once per forward pass, shared by every layer."""
    j, jp = pair_indices(vectors.shape[-2])
    unit = _unit(vectors)
    cosine = jnp.clip(jnp.sum(unit[..., j, :] * unit[..., jp, :], axis=-1), -1.0, 1.0)
    both_ways = jnp.asarray(np.where(j == jp, 1.0, 2.0), vectors.dtype)
    polynomials = legendre(cosine, degree)
    return jnp.stack([(2 * n + 1) / (4 * np.pi) * polynomials[n] * both_ways
                      for n in range(first, degree + 1)], axis=-2)


def power_spectra(kernels: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """kernels (..., L, P) of `pair_kernels`, weights (..., k, C) -> (..., L * C): per degree
    and channel, sum_m (sum_j w_jc Y_lm(u_j))**2, degree-major as `angular_invariants` of
    those moments: sum_p kernels_lp w_jc w_j'c over the pairs p = (j, j').

    Written as L * P multiply-adds over (..., C) slices, with the gradient by hand
    (`_power_spectra_vjp`): on XLA's CPU backend the batched (L, P) x (P, C) matmul per
    node took 7.7x as long forward and, with its autodiff transpose, 22.7x forward and
    backward, about 5 ms of a 49 ms training step (experiments/bench_power_spectra.py,
    experiments/profile_model.py)."""
    return _power_spectra(kernels, weights)


def einsum_power_spectra(kernels: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """`power_spectra` in its plain form, a batched (L, P) x (P, C) matmul per node with
    JAX's own gradient: the reference its hand-written gradient is tested against and the
    baseline of experiments/bench_power_spectra.py."""
    j, jp = pair_indices(weights.shape[-2])
    spectra = jnp.einsum("...lp,...pc->...lc", kernels, weights[..., j, :] * weights[..., jp, :])
    return spectra.reshape(*spectra.shape[:-2], -1)


def _pair_products(weights: jnp.ndarray) -> list[jnp.ndarray]:
    """weights (..., k, C) -> the P (..., C) products w_j * w_j' over `pair_indices`."""
    j, jp = pair_indices(weights.shape[-2])
    return [weights[..., a, :] * weights[..., b, :] for a, b in zip(j, jp)]


@jax.custom_vjp
def _power_spectra(kernels: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    products = _pair_products(weights)
    degrees = [sum(kernels[..., l, p, None] * product for p, product in enumerate(products))
               for l in range(kernels.shape[-2])]
    return jnp.concatenate(degrees, axis=-1)


def _power_spectra_forward(kernels, weights):
    return _power_spectra(kernels, weights), (kernels, weights)


def _power_spectra_vjp(residuals, grad):
    """grad (..., L * C) -> (d kernels (..., L, P), d weights (..., k, C))."""
    kernels, weights = residuals
    num_degrees, k = kernels.shape[-2], weights.shape[-2]
    grad = grad.reshape(*grad.shape[:-1], num_degrees, -1)  # (..., L, C)
    products = _pair_products(weights)
    d_products = [sum(kernels[..., l, p, None] * grad[..., l, :] for l in range(num_degrees))
                  for p in range(len(products))]  # (..., C) per pair
    d_kernels = jnp.stack([jnp.stack([jnp.sum(grad[..., l, :] * product, axis=-1)
                                      for product in products], axis=-1)
                           for l in range(num_degrees)], axis=-2)
    # d (w_j w_j') / d w_a: w_j' where j = a, w_j where j' = a (2 w_a on the diagonal).
    pair_of = {}
    for p, (a, b) in enumerate(zip(*pair_indices(k))):
        pair_of[a, b] = pair_of[b, a] = p
    d_weights = jnp.stack([sum((2.0 if a == b else 1.0) * d_products[pair_of[a, b]]
                               * weights[..., b, :] for b in range(k)) for a in range(k)],
                          axis=-2)
    return d_kernels.astype(kernels.dtype), d_weights.astype(weights.dtype)


_power_spectra.defvjp(_power_spectra_forward, _power_spectra_vjp)
