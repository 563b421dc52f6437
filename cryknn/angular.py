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
    those moments (one small matmul per node instead of harmonics and squares)."""
    j, jp = pair_indices(weights.shape[-2])
    products = weights[..., j, :] * weights[..., jp, :]  # (..., P, C)
    spectra = jnp.einsum("...lp,...pc->...lc", kernels, products)
    return spectra.reshape(*spectra.shape[:-2], -1)
