"""Bounded fuzz test of the tools on hostile CIFs (issue 21).

A seeded generator writes a few hundred CIFs: valid crystals, then the same with hostile
values (cells from 1e-25 to 1e300 A, NaN, placeholder and dummy element symbols,
coordinates of 1e300, piles of coincident sites, unknown space groups, truncated files,
byte order marks, non-ASCII labels, binary junk), plus a FIFO and a link to /dev/zero.
`cryknn predict` and `cryknn featurize` each run once over the folder and must: exit 0,
1 or 2, print no traceback, stay under a memory cap, and account for every file (scored,
or named with the reason it was skipped)."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import pytest

from tests import side_lane
from tests.conftest import REPO, make_cif, subprocess_env

NUM_FILES = 300
MEMORY_CAP_MB = 2048

SYMBOLS = ["H", "C", "N", "O", "Zn", "Cu", "Na", "Cl", "Fe", "Si", "D", "T", "Og", "U",
           "Uuo", "X", "Q1", "Du", "Cg", "?", "Ow1", "Cu2+", "C\u00e9", "Zz", "1"]
CELL_VALUES = ["5", "12.5", "0", "-3", "1e-25", "1e-9", "0.000001", "1e6", "1e9", "1e19",
               "1e300", "nan", "?", "abc", "4.2(3)"]
ANGLES = ["90", "60", "120", "0", "180", "179.99999", "1e-5", "?", "109.47"]
COORDS = ["0", "0.5", "0.25", "1/3", "0.5(2)", "1e300", "-1e7", "nan", "?", "1.0", "-0.0"]
GROUPS = ["_symmetry_space_group_name_H-M 'P 1'",
          "_space_group_name_H-M_alt 'F m -3 m'",
          "_space_group_name_H-M_alt 'P 63/m m c'",
          "_space_group_name_H-M_alt 'Q 9 9'",
          "_space_group_name_Hall '-P 2ac 2n'",
          "loop_\n_symmetry_equiv_pos_as_xyz\n'x,y,z'\n'-x,-y,-z'\n'x+1/2,y,q'\n",
          ""]


def _sane(rng: random.Random) -> str:
    n = rng.randint(1, 24)
    rows = [(f"{s}{i}", s, *(round(rng.random(), 4) for _ in range(3)))
            for i, s in enumerate(rng.choice(["C", "H", "O", "N", "Zn"]) for _ in range(n))]
    cell = " ".join([str(round(rng.uniform(3, 15), 3)) for _ in range(3)] + ["90"] * 3)
    return make_cif(rows, cell=cell, block=f"b{rng.randint(0, 99)}",
                    symmetry=rng.choice(GROUPS[:3]))


def _hostile(rng: random.Random) -> str:
    n = rng.randint(1, 12)
    rows = []
    for i in range(n):
        symbol = rng.choice(SYMBOLS) if rng.random() < 0.08 else rng.choice(SYMBOLS[:12])
        coords = [rng.choice(COORDS) if rng.random() < 0.3 else str(round(rng.random(), 3))
                  for _ in range(3)]
        rows.append((f"A{i}", symbol, *coords, rng.choice(["1", "0.5", "0", "-1", "2", "?"])))
    if rng.random() < 0.15:  # a pile of coincident sites
        rows += [(f"P{i}", "C", "0.1", "0.2", "0.3", "1") for i in range(rng.choice([50, 3000]))]
    cell = " ".join([rng.choice(CELL_VALUES) if rng.random() < 0.12 else "7.5"
                     for _ in range(3)]
                    + [rng.choice(ANGLES) if rng.random() < 0.1 else "90" for _ in range(3)])
    group = rng.choice(GROUPS) if rng.random() < 0.3 else rng.choice(GROUPS[:3])
    return make_cif(rows, cell=cell, symmetry=group,
                    site_columns=["label", "type_symbol", "fract_x", "fract_y", "fract_z",
                                  "occupancy"])


def _corrupt(rng: random.Random, text: str) -> bytes:
    data = text.encode("utf-8")
    kind = rng.randrange(6)
    if kind == 0:
        return data[:rng.randrange(len(data) + 1)]  # truncated
    if kind == 1:
        return b"\xef\xbb\xbf" + data  # byte order mark
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))  # junk
    if kind == 3:
        return data + data  # the block twice
    if kind == 4:
        lines = data.split(b"\n")
        del lines[rng.randrange(len(lines))]
        return b"\n".join(lines)
    return data.replace(b"A0", "\u00c50".encode("utf-8"))  # non-ASCII label


def write_corpus(folder: Path, seed: int = 21, num: int = NUM_FILES) -> list[Path]:
    """`num` generated CIFs (a third each sane, hostile, corrupted) plus a FIFO and a link
    to /dev/zero, all named *.cif; returns their paths."""
    rng = random.Random(seed)
    paths = []
    for i in range(num):
        kind = i % 3
        text = _sane(rng) if kind == 0 else _hostile(rng)
        data = _corrupt(rng, text) if kind == 2 else text.encode("utf-8")
        path = folder / f"f{i:03d}.cif"
        path.write_bytes(data)
        paths.append(path)
    os.mkfifo(folder / "pipe.cif")
    os.symlink("/dev/zero", folder / "zero.cif")
    return paths + [folder / "pipe.cif", folder / "zero.cif"]


def _tool(module: str, *args: str) -> list[str]:
    """argv of the tool in a child Python that reports its own peak memory on stderr."""
    code = ("import atexit, resource, sys\n"
            "atexit.register(lambda: sys.stderr.write('PEAK_KB %d\\n' % "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
            f"from {module} import run\nrun(sys.argv)\n")
    return [sys.executable, "-c", code, *args]


def _fuzz_job(folder: Path) -> side_lane.Job:
    """The corpus (written at collection, in folder/in), and `cryknn predict` and `cryknn
    featurize` over it side by side, on the side lane: each tool mostly keeps one core."""
    corpus = folder / "in"
    corpus.mkdir()
    write_corpus(corpus)
    # One shipped model (not the checking default's three) is enough for input handling.
    return side_lane.commands_job(folder, [
        _tool("cryknn.predict", "--model_name=default", f"--out={folder / 'scores.csv'}",
              str(corpus)),
        _tool("cryknn.featurize", "--k=3", f"--out={folder / 'f.npz'}", str(corpus))],
        subprocess_env(), REPO)


def _peak_mb(stderr: str) -> float:
    lines = [line for line in stderr.splitlines() if line.startswith("PEAK_KB ")]
    assert lines, stderr[-2000:]
    return int(lines[-1].split()[1]) / 1024


@pytest.fixture
def runs(side_job):
    """The corpus, and what `cryknn predict` and `cryknn featurize` did with it."""
    folder = side_job.folder
    predict, featurize = side_job.commands()
    return {"folder": folder / "in", "paths": sorted((folder / "in").iterdir()),
            "scores": folder / "scores.csv", "table": folder / "f.npz",
            "predict": predict, "featurize": featurize}


FUZZ_RUN = pytest.mark.side_lane(job=_fuzz_job, name="fuzz")


@FUZZ_RUN
def test_predict_accounts_for_every_hostile_file(runs):
    folder, paths, out, r = runs["folder"], runs["paths"], runs["scores"], runs["predict"]
    assert r.returncode in (0, 1, 2), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _peak_mb(r.stderr) < MEMORY_CAP_MB
    assert r.returncode == 1, r.stderr[-3000:]  # some are hostile, the sane ones scored
    with open(out, newline="") as f:
        scored = {row["structure_id"].split(":", 1)[0] for row in csv.DictReader(f)}
    named = {line.split(": ", 1)[0] for line in r.stderr.splitlines() if ": " in line}
    for path in paths:
        assert path.stem in scored or str(path) in named, path
    assert len(scored) >= NUM_FILES // 4
    for line in r.stderr.splitlines():  # every skip has a reason after the file name
        if line.startswith(str(folder)):
            assert len(line.split(": ", 2)) == 3 and line.split(": ", 2)[2].strip(), line


@FUZZ_RUN
def test_featurize_survives_every_hostile_file(runs):
    import numpy as np

    paths, out, r = runs["paths"], runs["table"], runs["featurize"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert _peak_mb(r.stderr) < MEMORY_CAP_MB
    ids = set(np.load(out)["structure_id"])
    skipped = int(r.stdout.split(" skipped")[0].rsplit("\n", 1)[-1])
    featurised = {i.split(":", 1)[0] for i in ids}
    assert len(featurised) >= NUM_FILES // 4
    assert len(featurised) + skipped >= len(paths)  # every file scored or skipped
