"""Errors meant for the user: one readable line, no traceback.

Every error a user can cause or fix (a bad flag, a missing dataset, a file that is not a
model) subclasses `UserError`. Command-line tools catch `UserError`, print
`error: <message>` as one line and exit with status 2 (`cryknn.cli.command`). Anything else
that escapes is a bug and keeps its traceback.

This module imports nothing from cryknn, so every other module may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every user-facing error; the message is one readable line."""


class ConfigError(UserError, ValueError):
    """A flag value, configuration or workdir that cannot be used."""


class SelectionError(ConfigError):
    """An element selection the data cannot satisfy (absent element, too many elements)."""


class UnknownElementError(UserError, ValueError):
    """A type symbol that names no element (X, ?, Q, dummy atoms, typos)."""


class DataError(UserError):
    """A dataset cannot be built or read as asked (bad name, missing folder, not built)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """An embedded data set (a core-mof archive, pyxtal's database) is not installed."""


class DataFormatError(DataError, ValueError):
    """A file or database does not have the layout its reader understands."""


class FeaturizeError(UserError, ValueError):
    """Input that cannot be featurised (singular lattice, k < 1, NaN coordinates)."""


class WarmStartError(UserError, ValueError):
    """Two models that cannot be warm-started from each other."""


class ModelError(UserError):
    """A trained model that cannot be used: missing, damaged, or giving non-finite outputs."""


class TrainingDivergedError(UserError):
    """Training produced a non-finite loss or non-finite parameters."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class InputNotFoundError(DataError, FileNotFoundError):
    """A file or folder given to read does not exist."""
