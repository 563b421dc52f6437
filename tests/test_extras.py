"""Optional extras (cryknn.extras): found without importing, a missing one is one line
naming the pip install command."""

from __future__ import annotations

import pytest

from cryknn import errors
from cryknn import extras


def test_installed_and_missing(monkeypatch):
    assert extras.installed("numpy") and not extras.installed("no_such_module_cryknn")
    monkeypatch.setitem(extras.MODULES, "fake", ("numpy", "no_such_module_cryknn"))
    assert extras.missing("fake") == ["no_such_module_cryknn"]


def test_require_names_the_extra_and_the_command(monkeypatch):
    monkeypatch.setitem(extras.MODULES, "fake", ("no_such_module_cryknn",))
    with pytest.raises(errors.MissingExtraError) as e:
        extras.require("fake", "doing x")
    message = str(e.value)
    assert "\n" not in message and "doing x" in message
    assert "pip install 'cryknn[fake]'" in message
