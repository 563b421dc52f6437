"""What every command-line tool promises: help, one-line errors, exit status, quiet stderr,
no lost files, and skipped or removed input always reported."""

import os
import sys

import numpy as np
import pytest

from cryknn.cli import command
from cryknn import errors
from tests.conftest import (NACL_CIF, REPO, error_lines, make_cif, progress_free, run_module,
                            subprocess_env)
from tests import side_lane, toy_data

TOOLS = {"cryknn.main": "[--k=5]", "cryknn.featurize": "PATH", "cryknn.data": "build|stats",
         "cryknn.predict": "PATH"}


@pytest.mark.parametrize("module", sorted(TOOLS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_a_usage_line(module, flag):
    r = run_module(module, flag)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"usage: python -m {module}") and TOOLS[module] in first
    assert "flags:" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("module", sorted(TOOLS))
def test_a_bad_flag_is_one_error_line_and_exit_2(module):
    r = run_module(module, "--no_such_flag=1")
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no_such_flag" in lines[0]


def test_the_cryknn_command_dispatches_subcommands():
    r = run_module("cryknn.cli", "--help")
    assert r.returncode == 0 and "train" in r.stdout and "predict" in r.stdout
    r = run_module("cryknn.cli", "featurize", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: cryknn featurize")
    r = run_module("cryknn.cli", "frobnicate")
    assert r.returncode == 2 and error_lines(r)[0].startswith("error: unknown subcommand")
    assert run_module("cryknn.cli").returncode == 2


def test_featurize_keeps_stderr_quiet(tmp_path):
    (tmp_path / "nacl.cif").write_text(NACL_CIF)
    r = run_module("cryknn.featurize", "--k=2", f"--out={tmp_path / 'x.npz'}",
                   str(tmp_path / "nacl.cif"))
    assert r.returncode == 0, r.stderr
    noise = progress_free(r.stderr)  # the progress bar is expected, at any speed
    assert not noise, noise


def test_user_errors_and_interrupts_become_exit_codes(capsys):
    def refuses(argv):
        raise errors.DataError("no such dataset\nsecond line")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert command._call(refuses, ["x"]) == 2
    assert capsys.readouterr().err == "error: no such dataset second line\n"
    assert command._call(interrupted, ["x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def cannot_write(argv):
        open("/proc/no/such/file", "w")

    assert command._call(cannot_write, ["x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/proc/no/such/file" in err and err.count("\n") == 1


def test_looping_and_dangling_links_are_reported_not_fatal(tmp_path):
    (tmp_path / "good.cif").write_text(NACL_CIF)
    os.symlink("loop.cif", tmp_path / "loop.cif")
    os.symlink("missing.cif", tmp_path / "dangling.cif")
    out = tmp_path / "x.npz"
    r = run_module("cryknn.featurize", "--k=2", f"--out={out}", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "2 skipped" in r.stdout and "loop.cif" in r.stdout and "dangling.cif" in r.stdout
    assert len(np.load(out)["distances"]) == 8


def test_the_npz_is_written_atomically_where_asked(tmp_path):
    (tmp_path / "nacl.cif").write_text(NACL_CIF)
    out = tmp_path / "features.npz"
    out.write_bytes(b"an older file")
    r = run_module("cryknn.featurize", "--k=2", f"--out={out}", str(tmp_path / "nacl.cif"))
    assert r.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["features.npz", "nacl.cif"]  # no temporary left
    assert len(np.load(out)["distances"]) == 8


def test_atoms_removed_by_reading_policies_are_counted(tmp_path):
    cif = make_cif([("C1", "C", 0.10, 0.1, 0.1), ("C2", "C", 0.13, 0.1, 0.1),
                    ("O1", "O", 0.5, 0.5, 0.5)], cell="10 10 10 90 90 90", block="dup")
    (tmp_path / "dup.cif").write_text(cif)
    r = run_module("cryknn.featurize", "--k=2", f"--out={tmp_path / 'x.npz'}",
                   str(tmp_path / "dup.cif"))
    assert r.returncode == 0, r.stderr
    assert "1  duplicate atoms merged (merge_duplicates) in 1 structure" in r.stdout


def _quiet_training_job(folder):
    toy_data.write_toy_cache(str(folder / "data"), "toy/quiet", 5, (1, 6, 8))
    return side_lane.Job(
        [sys.executable, "-m", "cryknn.main", "--dataset=toy/quiet",
         f"--data_dir={folder / 'data'}", f"--workdir={folder / 'w'}", "--model=mlp",
         "--epochs=1", "--batch_size=64", "--num_elements=3", "--width=16", "--depth=1",
         "--log_every=1000"], subprocess_env(), REPO)


@pytest.mark.side_lane(job=_quiet_training_job)
def test_train_keeps_stderr_quiet(side_job):
    r = side_job.result
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), r.stderr
    assert "test: accuracy" in r.stdout
