"""Spherical harmonics and their power spectra (cryknn.angular): orthonormal on the sphere,
power spectra invariant under rotations."""

from __future__ import annotations

import numpy as np

from cryknn import angular
from tests.conftest import random_rotation


def test_spherical_harmonics_are_orthonormal_and_rotate_within_degrees():
    rng = np.random.default_rng(0)
    # Lebedev-free check: a dense Fibonacci sphere integrates degree <= 8 products closely.
    n = 20000
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    points = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], 1)
    y = np.asarray(angular.spherical_harmonics(points.astype(np.float32), 4), np.float64)
    gram = y.T @ y * (4 * np.pi / n)
    np.testing.assert_allclose(gram, np.eye(25), atol=2e-3)
    vectors = rng.normal(size=(7, 3)).astype(np.float32)
    moments = np.asarray(angular.spherical_harmonics(vectors, 4)).sum(0)[:, None]
    turned = np.asarray(angular.spherical_harmonics(
        (vectors @ random_rotation(5).T).astype(np.float32), 4)).sum(0)[:, None]
    np.testing.assert_allclose(angular.angular_invariants(turned, 4),
                               angular.angular_invariants(moments, 4), rtol=1e-4, atol=1e-5)


def test_pair_form_gives_the_power_spectra_of_harmonic_moments():
    """angular.power_spectra(pair_kernels) is the addition theorem applied to
    angular_invariants of the weighted harmonic moments: the same numbers, for random
    shells with ties, a zero vector and opposite directions, and for k = 1."""
    rng = np.random.default_rng(3)
    for k in (1, 6):
        vectors = rng.normal(size=(4, k, 3))
        vectors[0, 0] = 0.0  # a zero vector reads as +x in both forms
        if k > 1:
            vectors[1, 1] = -vectors[1, 0]
            vectors[2, 1] = vectors[2, 0] * 2.5  # the same direction twice
        weights = rng.normal(size=(4, k, 6))
        y = np.asarray(angular.spherical_harmonics(vectors.astype(np.float32), 4), np.float64)
        moments = np.einsum("nks,nkc->nsc", y[..., 1:], weights)
        want = np.asarray(angular.angular_invariants(moments, 4, first=1))
        kernels = angular.pair_kernels(vectors.astype(np.float32), 4, first=1)
        got = np.asarray(angular.power_spectra(kernels, weights.astype(np.float32)))
        assert got.shape == want.shape == (4, 4 * 6)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_power_spectra_gradients_match_autodiff_of_the_plain_form():
    """Values and both gradients (weights: what training uses; kernels: for completeness)
    of the hand-written vjp against autodiff of the plain einsum form, with a pack axis, for
    k = 1, 2 and 5 and degrees 1..4."""
    import jax

    rng = np.random.default_rng(7)
    for k in (1, 2, 5):
        kernels = rng.normal(size=(2, 3, 4, k * (k + 1) // 2)).astype(np.float32)
        weights = rng.normal(size=(2, 3, k, 6)).astype(np.float32)
        cotangent = rng.normal(size=(2, 3, 4 * 6)).astype(np.float32)
        got, got_vjp = jax.vjp(angular.power_spectra, kernels, weights)
        want, want_vjp = jax.vjp(angular.einsum_power_spectra, kernels, weights)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
