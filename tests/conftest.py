"""Helpers shared by the tests: paths, running the CLIs in a subprocess, small CIFs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests import side_lane

REPO = Path(__file__).resolve().parents[1]
SHARED_COD = REPO.parent / "shared" / "data" / "cod"  # absent in a user's clone: skip

# One XLA compilation cache for the session, shared by this process and every child
# (`python -m cryknn.<tool>`, sharded and multi-process runs): the same programs (a toy
# model's steps, the k-NN kernel of a small cell) are compiled once per session, not once
# per test and child. It starts empty, so a session never depends on an earlier one, and
# the tools' own cache in ~/.cache is left alone.
_XLA_CACHE = tempfile.mkdtemp(prefix="cryknn_test_xla_")
for _name, _value in (("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE),
                      ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                      ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1"),
                      ("CRYKNN_XLA_CACHE", _XLA_CACHE)):
    os.environ[_name] = _value
if "jax" in sys.modules:  # imported before this file: its flags have already read the env
    import jax

    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# XLA's CPU backend at LLVM -O0 for the session and every child: the suite mostly compiles
# small programs (each toy model's steps, each k-NN kernel shape), and -O0 halves that
# (training the toy tree and graph models: 31 s and 27 s -> 17 s and 15 s; the 8-device
# sharded step test: 40 s -> 22 s) while what the suite runs is no slower (the shipped
# model on 40,000 atoms, the k-NN kernel on 300 CoRE MOF cells). XLA builds and optimises
# the same programs; only LLVM's optimisation of their machine code is skipped, so results
# agree to float rounding. A level set in XLA_FLAGS wins:
# XLA_FLAGS=--xla_backend_optimization_level=3 runs the suite at XLA's default.
_OPT_LEVEL = "--xla_backend_optimization_level"
if _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_LEVEL}=0".strip()


# Children that tests only wait for run one after another beside the in-process tests
# (tests/side_lane.py), queued as soon as collection shows which are needed, in the order
# their tests come. Tests marked `side_lane(job=..., name=...)` with the same name share
# one child.
LANE = side_lane.SideLane()


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("side_lane")
        if marker is not None:
            LANE.submit(marker.kwargs.get("name", item.nodeid), marker.kwargs["job"])


@pytest.fixture
def side_job(request) -> side_lane.Done:
    """The finished child of a test marked `side_lane(job=...)`: its output and folder."""
    marker = request.node.get_closest_marker("side_lane")
    assert marker is not None, "side_job needs @pytest.mark.side_lane(job=...)"
    return LANE.result(marker.kwargs.get("name", request.node.nodeid), marker.kwargs["job"])


def pytest_terminal_summary(terminalreporter):
    """The suite's CPU seconds (this process and every child it waited for): on a loaded
    machine its wall time follows them, so this is the number to keep small."""
    import resource

    own, children = (resource.getrusage(who)
                     for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = [u.ru_utime + u.ru_stime for u in (own, children)]
    lane = ", ".join(f"{name.rsplit('::', 1)[-1]} {s:.0f} s"
                     for name, s in LANE.seconds.items())
    terminalreporter.write_line(
        f"suite CPU {sum(cpu):.0f} s (pytest {cpu[0]:.0f} s, child processes {cpu[1]:.0f} s)"
        + (f"; side lane wall: {lane}" if lane else ""))


def pytest_unconfigure(config):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
    LANE.stop()


def subprocess_env(**extra: str) -> dict:
    """The environment of a child Python: this checkout first on the path, JAX on the CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    if "XLA_FLAGS" in extra:  # added to the session's flags (the level above), not instead
        extra = dict(extra, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {extra['XLA_FLAGS']}".strip())
    env.update(extra)
    return env


def run_module(module: str, *args: str, timeout: float = 300, **env: str
               ) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in the repository, output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(**env), timeout=timeout, cwd=REPO)


def start_module(module: str, *args: str, **env: str) -> subprocess.Popen:
    """`python -m <module> args...` started, not waited for (`finish` collects it): tools
    that mostly wait on one core can run side by side on the suite's two."""
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**env), cwd=REPO)


def finish(child: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a started child; its output as `subprocess.run` would give it."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def run_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` in the repository, output captured as text."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout, cwd=REPO)


# What the core install (`pip install cryknn`, no extras) lacks: a child Python that cannot
# import these behaves as a core-only venv would, without building one.
EXTRA_MODULES = ("tensorflow", "tensorflow_datasets", "optax", "orbax", "matplotlib", "pandas",
                 "tensorboard", "ase", "pymatgen", "apache_beam", "core_mof")


def start_core_only(*args: str, **env: str) -> subprocess.Popen:
    """`cryknn args...` started in a child whose optional dependencies (EXTRA_MODULES) cannot
    be imported (`finish` collects it); an argument 'python:CODE' runs CODE instead."""
    block = f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES!r}))"
    if args and args[0].startswith("python:"):
        code = f"{block}\n{args[0][len('python:'):]}"
    else:
        code = f"{block}\nfrom cryknn import cli\ncli.main(['cryknn', *{list(map(str, args))!r}])"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(**env),
                            cwd=REPO)


def run_core_only(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`start_core_only`, waited for."""
    return finish(start_core_only(*args, **env), timeout)


# A tqdm progress bar line, at any speed ('3.2file/s' or '1.66s/file').
_PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")


def progress_free(stderr: str) -> list[str]:
    """The non-empty stderr lines that are not a tqdm progress bar."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not _PROGRESS.search(line)]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The non-empty lines a CLI wrote to stderr."""
    return [line for line in result.stderr.splitlines() if line.strip()]


def make_cif(sites, cell="5 6 7 90 90 90", block="test", symmetry="", site_columns=None):
    """A CIF block: sites are rows of values for site_columns (default label, type, x, y, z);
    cell is 'a b c alpha beta gamma' (None: no cell); symmetry is raw CIF text."""
    columns = site_columns or ["label", "type_symbol", "fract_x", "fract_y", "fract_z"]
    lines = [f"data_{block}"]
    if cell is not None:
        for tag, value in zip(["length_a", "length_b", "length_c",
                               "angle_alpha", "angle_beta", "angle_gamma"], cell.split()):
            lines.append(f"_cell_{tag} {value}")
    lines.append(symmetry)
    lines.append("loop_")
    lines += [f"_atom_site_{c}" for c in columns]
    lines += [" ".join(str(v) for v in row) for row in sites]
    return "\n".join(lines) + "\n"


def symmetry_ops(ops) -> str:
    """A `_symmetry_equiv_pos_as_xyz` loop of the given operations ('x,y,z', ...)."""
    return "loop_\n_symmetry_equiv_pos_as_xyz\n" + "".join(f"'{op}'\n" for op in ops)


def read_one(text, options=None):
    """The one structure of CIF text read without skips (checked by check_structure)."""
    from cryknn import cif

    found, skips = cif.read_cif_text(text, "t", options or cif.ReadOptions())
    assert not skips, skips
    assert len(found) == 1
    check_structure(found[0])
    return found[0]


def skip_reason(text, options=None):
    """The reason of the one skip CIF text gives (and no structure)."""
    from cryknn import cif

    found, skips = cif.read_cif_text(text, "t", options or cif.ReadOptions())
    assert not found
    assert len(skips) == 1
    return skips[0].reason


def check_structure(s) -> None:
    """The invariants of every Structure a reader returns (shapes, dtypes, ranges)."""
    n = s.num_atoms
    assert n > 0
    assert s.lattice.shape == (3, 3) and s.lattice.dtype == np.float64
    assert s.frac.shape == (n, 3) and s.frac.dtype == np.float64
    assert np.all(s.frac >= 0) and np.all(s.frac < 1)
    assert s.numbers.shape == (n,) and s.numbers.dtype == np.int32
    assert np.all((s.numbers >= 1) & (s.numbers <= 118))
    assert s.labels.shape == (n,) and s.labels.dtype.kind == "U"
    assert s.occupancies.shape == (n,) and s.occupancies.dtype == np.float32
    assert s.volume > 0
    assert ":" in s.id


# Rock salt from its H-M symbol: 8 atoms in the unit cell, every first neighbour at a / 2.
NACL_CIF = make_cif([("Na1", "Na", 0, 0, 0), ("Cl1", "Cl", 0.5, 0.5, 0.5)],
                    cell="5.64 5.64 5.64 90 90 90", block="nacl",
                    symmetry="_space_group_name_H-M_alt 'F m -3 m'")

# Methane in a P1 box, plus an O and a Zn atom (an element most models do not know).
METHANE_CIF = make_cif([
    ("C1", "C", 0.5, 0.5, 0.5),
    ("H1", "H", 0.6049, 0.6049, 0.6049),
    ("H2", "H", 0.3951, 0.3951, 0.6049),
    ("H3", "H", 0.3951, 0.6049, 0.3951),
    ("H4", "H", 0.6049, 0.3951, 0.3951),
    ("O1", "O", 0.0, 0.0, 0.0),
    ("Zn1", "Zn", 0.0, 0.5, 0.0),
], cell="6 6 6 90 90 90", block="methane", symmetry="_symmetry_space_group_name_H-M 'P 1'")


@pytest.fixture(scope="session")
def toy_workdir(tmp_path_factory) -> str:
    """A workdir with a small mlp trained on toy features of H, C and O (k = 5)."""
    from cryknn import config, train
    from tests import toy_data

    data_dir = str(tmp_path_factory.mktemp("toy_data"))
    toy_data.write_toy_cache(data_dir, "toy/predict", 5, (1, 6, 8))
    workdir = str(tmp_path_factory.mktemp("toy_workdir"))
    train.train_and_evaluate(
        config.Config(dataset="toy/predict", data_dir=data_dir, model="mlp", k=5,
                      num_elements=3, epochs=1, batch_size=64, width=16, depth=1,
                      log_every=1000), workdir)
    return workdir


def random_rotation(seed: int) -> np.ndarray:
    """(3, 3) a proper rotation matrix drawn at random (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q
