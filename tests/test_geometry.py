"""Lattice geometry shared by the reader and the featuriser (cryknn.geometry), against
brute force."""

from __future__ import annotations

import numpy as np

from cryknn import geometry


def test_interplanar_spacings_are_the_heights_of_the_cell():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lattice = rng.normal(size=(3, 3)) + 3 * np.eye(3)
        h = geometry.interplanar_spacings(lattice)
        volume = abs(np.linalg.det(lattice))
        for a in range(3):
            b, c = [i for i in range(3) if i != a]
            area = np.linalg.norm(np.cross(lattice[b], lattice[c]))
            np.testing.assert_allclose(h[a], volume / area, rtol=1e-12)


def test_wrap_lands_in_the_unit_interval_even_for_tiny_negatives():
    frac = np.array([[-1e-17, 1.0, 2.25], [-0.5, 0.999, -3.0]])
    wrapped = geometry.wrap(frac)
    assert np.all((wrapped >= 0) & (wrapped < 1))
    np.testing.assert_allclose(wrapped, [[0.0, 0.0, 0.25], [0.5, 0.999, 0.0]], atol=1e-15)
    assert frac[0, 0] == -1e-17  # a new array
