"""The optional dependencies: which extra brings what, checked before any work starts.

The core install reads, featurises and scores; training and dataset builds need the
`train` extra, non-CIF formats the `ase` extra, `Scores.to_pandas` the `pandas` extra.
`require('train', 'cryknn train')` raises MissingExtraError, one line naming the
`pip install` command, when a module of the extra cannot be imported (nothing is imported
to find out).
"""

from __future__ import annotations

import importlib.util

from cryknn import errors

# The top-level modules each extra brings (pyproject.toml [project.optional-dependencies]).
MODULES = {
    "train": ("optax", "orbax.checkpoint", "tensorflow", "tensorflow_datasets", "matplotlib",
              "tensorboard"),
    "ase": ("ase",),
    "pandas": ("pandas",),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it; a package's parent is)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str) -> list[str]:
    return [m for m in MODULES[extra] if not installed(m)]


def require(extra: str, what: str) -> None:
    """Raises MissingExtraError when `extra` is not (fully) installed; `what` names the use."""
    absent = missing(extra)
    if absent:
        raise errors.MissingExtraError(
            f"{what} needs the {extra!r} extra ({', '.join(absent)} not installed): "
            f"pip install 'cryknn[{extra}]'")
