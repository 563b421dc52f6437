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
