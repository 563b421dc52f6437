"""Workdirs and checkpoints (cryknn.checkpoints): a workdir holds one run, is locked while
it trains, and its run definition is checked before anything resumes."""

from __future__ import annotations

import os

import pytest

from cryknn import checkpoints
from cryknn import errors


def test_two_runs_never_share_a_workdir(tmp_path):
    with checkpoints.WorkdirLock(str(tmp_path)):
        with pytest.raises(errors.ConfigError, match="in use by another run"):
            with checkpoints.WorkdirLock(str(tmp_path)):
                pass
    with checkpoints.WorkdirLock(str(tmp_path)):  # released: free again
        pass


def test_a_workdir_of_another_run_is_refused(tmp_path):
    run = {"config": {}, **{name: None for name in checkpoints._run_keys()}}
    checkpoints.write_run(str(tmp_path), dict(run, k=5))
    checkpoints.check_same_run(str(tmp_path), dict(run, k=5))  # the same run resumes
    with pytest.raises(errors.ConfigError, match="k=5, not 6"):
        checkpoints.check_same_run(str(tmp_path), dict(run, k=6))
    checkpoints.check_same_run(str(tmp_path / "empty"), dict(run, k=6))  # nothing there


def test_an_unreadable_run_definition_names_its_file(tmp_path):
    with pytest.raises(errors.ModelError, match="no trained model"):
        checkpoints.read_run(str(tmp_path))
    (tmp_path / checkpoints.CONFIG_JSON).write_text("{not json")
    with pytest.raises(errors.ModelError, match=checkpoints.CONFIG_JSON):
        checkpoints.read_run(str(tmp_path))


def test_an_unwritable_workdir_is_one_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.ConfigError, match="cannot write"):
        checkpoints.check_workdir(os.path.join(str(blocker), "w"))
