"""Tests of cryknn.datasets, the crystal_structures TFDS builder and the data CLI.

Builds go to tmp_path data dirs on tiny CIF folders written here, and on the first few
members of the core-mof archive (the `limit` builder kwarg); the Beam test needs
apache-beam and is skipped without it.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cryknn import datasets
from cryknn import errors
from cryknn import families
from cryknn import cif
from cryknn.datasets import crystal_structures as names
from cryknn.datasets.crystal_structures import parsing
from tests import side_lane
from tests.conftest import (REPO, error_lines, make_cif, run_module, subprocess_env,
                            symmetry_ops)


def test_element_counter():
    c = parsing.ElementCounter()
    c.add(np.array([6, 6, 8, 1]))
    c.add(np.array([6, 29]))
    other = parsing.ElementCounter()
    other.add(np.array([1, 1]))
    js = parsing.ElementCounter.merged([c, other]).to_json()
    assert js["structures"] == 3 and js["atoms"] == 8
    assert list(js["elements"]) == ["H", "C", "O", "Cu"]  # most atoms first, then Z
    assert js["elements"]["C"] == {"atoms": 3, "structures": 2}
    assert js["elements"]["H"] == {"atoms": 3, "structures": 2}
    assert datasets.top_elements({"splits": {"train": js}}, 3) == ["H", "C", "O"]


@pytest.mark.parametrize("name", ["crystal_structures", "mnist/x", "crystal_structures/nope", ""])
def test_parse_dataset_name_rejects(name):
    with pytest.raises(errors.DataError):
        datasets.parse_dataset_name(name)


def test_parse_dataset_name():
    assert datasets.parse_dataset_name("crystal_structures/cif_dir:1.0.0") == (
        "crystal_structures", "cif_dir", "1.0.0")


# --------------------------------------------------------------------------------------
# A tiny CIF folder: every split gets families, plus files the reader skips.

def _cif(block, sites, a=5.0, b=6.0, c=7.0, ops=None):
    return make_cif(sites, cell=f"{a} {b} {c} 90 90 90", block=block,
                    symmetry=symmetry_ops(ops) if ops else "")


def _refcode_in(split, start=0):
    """The first refcode-like family name AAAAxx (from `start`) that falls in split."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(start, 26 * 26):
        ref = "QZ" + "RT" + letters[i // 26] + letters[i % 26]
        if families.split_of(ref) == split:
            return ref
    raise AssertionError(split)


def write_cif_folder(root, splits=families.SPLITS):
    """CIFs whose families cover `splits`; returns {file name: split}."""
    files = {}
    os.makedirs(os.path.join(root, "sub", "deeper"), exist_ok=True)
    for k, split in enumerate(splits):
        ref = _refcode_in(split)
        files[f"{ref}_clean.cif"] = _cif(ref, [("Na1", "Na", 0, 0, 0), ("Cl1", "Cl", 0.5, 0.5, 0.5)],
                                         a=5.64 + k, b=5.64, c=5.64)
        files[os.path.join("sub", f"{ref}01_charged.cif")] = _cif(  # cells apart: no near-copies
            f"{ref}01", [("Zn1", "Zn", 0.1, 0.2, 0.3), ("O1", "O", 0.25, 0.1, 0.4)],
            a=5.0 + 0.6 * k, ops=["x,y,z", "-x,-y,-z"])
    train_ref = _refcode_in("train", start=200)
    # two blocks in one file
    files[os.path.join("sub", "deeper", f"{train_ref}.cif")] = (
        _cif("first", [("C1", "C", 0.1, 0.1, 0.1), ("H1", "H", 0.2, 0.1, 0.1),
                       ("H2", "H", 0.1, 0.2, 0.1)])
        + _cif("second", [("Cu1", "Cu", 0, 0, 0)], a=3.6, b=3.6, c=3.6))
    # read with skips: an unknown element, and a file that is not CIF at all
    files[f"{train_ref}02.cif"] = _cif("dummy", [("X1", "X", 0, 0, 0)])
    files[f"{train_ref}03.cif"] = "this is not a CIF file\n_cell_length_a\n"
    for name, text in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    return {name: families.split_of_id(families.file_stem(name)) for name in files}


def _reader_output(root):
    got = list(cif.iter_structures([root]))
    return ([s for s in got if isinstance(s, cif.Structure)],
            [s for s in got if isinstance(s, cif.Skip)])


def _examples(dataset, data_dir, splits=families.SPLITS):
    return {split: list(datasets.load_split(dataset, split, data_dir, build_if_missing=False))
            for split in splits}


@pytest.fixture(scope="module")
def cif_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifs")
    write_cif_folder(str(root))
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    lines = []
    datasets.build("crystal_structures/cif_dir", data_dir, manual_dir=str(root), num_workers=0,
               log=lines.append)
    return str(root), data_dir, "\n".join(lines)


def _dataset_dir(data_dir, config):
    return os.path.join(data_dir, "crystal_structures", config, names.VERSION)


def test_cif_dir_round_trip(cif_build):
    root, data_dir, _ = cif_build
    expected, _ = _reader_output(root)
    examples = _examples("crystal_structures/cif_dir", data_dir)
    got = {ex["id"]: (split, ex) for split, exs in examples.items() for ex in exs}
    assert sorted(got) == sorted(s.id for s in expected)
    assert all(examples.values())  # every split has examples
    for s in expected:
        split, ex = got[s.id]
        assert split == families.split_of_id(s.id)
        assert ex["family"] == families.family_of(s.id)
        assert ex["source"] == s.source
        assert ex["lattice"].dtype == np.float64 and ex["frac"].dtype == np.float64
        assert ex["numbers"].dtype == np.int32
        assert ex["frac"].shape == (s.num_atoms, 3) and ex["num_atoms"] == s.num_atoms
        # exact: float64 must not pass through tf.train.Example's float32 lists
        np.testing.assert_array_equal(ex["lattice"], s.lattice)
        np.testing.assert_array_equal(ex["frac"], s.frac)
        np.testing.assert_array_equal(ex["numbers"], s.numbers)
        np.testing.assert_array_equal(ex["occupancies"], s.occupancies)
        assert list(ex["labels"]) == [str(x) for x in s.labels]


def test_cif_dir_no_family_crosses_splits(cif_build):
    _, data_dir, _ = cif_build
    family_sets = {split: {ex["family"] for ex in exs}
                for split, exs in _examples("crystal_structures/cif_dir", data_dir).items()}
    assert not family_sets["train"] & family_sets["validation"]
    assert not family_sets["train"] & family_sets["test"]
    assert not family_sets["validation"] & family_sets["test"]


def test_cif_dir_skip_report(cif_build):
    root, data_dir, log = cif_build
    _, skips = _reader_output(root)
    assert skips  # the folder has unreadable content
    with open(os.path.join(_dataset_dir(data_dir, "cif_dir"), datasets.SKIPPED_CSV),
              newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "block", "reason"]
    assert sorted(tuple(r) for r in rows[1:]) == sorted(
        (s.file, s.block, s.reason) for s in skips)
    assert datasets.read_skips(_dataset_dir(data_dir, "cif_dir")) == [tuple(r) for r in rows[1:]]
    assert f"skipped: {len(skips)} blocks or files" in log


def test_cif_dir_element_stats(cif_build):
    root, data_dir, _ = cif_build
    expected, _ = _reader_output(root)
    stats = datasets.element_stats("crystal_structures/cif_dir", data_dir)
    assert stats["dataset"] == "crystal_structures/cif_dir"
    for split in families.SPLITS:
        counter = parsing.ElementCounter()
        for s in expected:
            if families.split_of_id(s.id) == split:
                counter.add(s.numbers)
        want = counter.to_json()
        got = stats["splits"][split]
        assert got["structures"] == want["structures"] and got["atoms"] == want["atoms"]
        assert got["elements"] == want["elements"]
    info = datasets.read_build_info(_dataset_dir(data_dir, "cif_dir"))
    assert info["manual_dir"] == os.path.abspath(root)
    assert sum(info["structures"].values()) == len(expected)


def test_load_structures_and_per_process(cif_build):
    _, data_dir, _ = cif_build
    whole = [ex["id"] for ex in datasets.load_split("crystal_structures/cif_dir", "train", data_dir)]
    mine = [ex["id"] for ex in datasets.load_split("crystal_structures/cif_dir", "train", data_dir,
                                               per_process=True)]
    assert mine == whole  # one JAX process reads the whole split
    recs = list(datasets.load_structures("crystal_structures/cif_dir", "train", data_dir))
    assert [r.id for r in recs] == whole
    assert all(isinstance(r, cif.Structure) for r in recs)


def test_registered_with_tfds(cif_build):
    _, data_dir, _ = cif_build
    datasets.get_builder("crystal_structures/cif_dir", data_dir)  # registers the builder
    import tensorflow_datasets as tfds

    builder = tfds.builder("crystal_structures/cif_dir", data_dir=data_dir)
    assert set(builder.info.splits) == set(families.SPLITS)
    assert tuple(c.name for c in builder.BUILDER_CONFIGS) == datasets.CONFIG_NAMES
    assert tfds.builder("crystal_structures", data_dir=data_dir).builder_config.name == \
        "core_mof_2019_asr"
    ds = tfds.load("crystal_structures/cif_dir", split="test", data_dir=data_dir)
    assert len(list(ds)) == builder.info.splits["test"].num_examples


def test_reuses_build_and_checks_manual_dir(cif_build, tmp_path):
    root, data_dir, _ = cif_build
    lines = []
    datasets.build("crystal_structures/cif_dir", data_dir, manual_dir=root, log=lines.append)
    assert "already built" in lines[0]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(errors.DataError, match="was built from"):
        datasets.build("crystal_structures/cif_dir", data_dir, manual_dir=str(other))


def test_parallel_build_matches_serial(cif_build, tmp_path):
    root, data_dir, _ = cif_build
    datasets.build("crystal_structures/cif_dir", str(tmp_path), manual_dir=root, num_workers=2,
               log=lambda _: None)
    serial = _examples("crystal_structures/cif_dir", data_dir)
    parallel = _examples("crystal_structures/cif_dir", str(tmp_path))
    for split in families.SPLITS:
        a = sorted(serial[split], key=lambda e: e["id"])
        b = sorted(parallel[split], key=lambda e: e["id"])
        assert [e["id"] for e in a] == [e["id"] for e in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["frac"], y["frac"])
    with open(os.path.join(_dataset_dir(data_dir, "cif_dir"), datasets.SKIPPED_CSV)) as f1, \
            open(os.path.join(_dataset_dir(str(tmp_path), "cif_dir"), datasets.SKIPPED_CSV)) as f2:
        assert sorted(f1) == sorted(f2)


def test_a_dead_parsing_worker_is_an_error_not_a_hang(tmp_path):
    """A script that parses with workers at its top level (no `if __name__ == "__main__":`)
    makes every spawned worker rerun it and die; the parser says so instead of waiting for
    the lost chunk forever (what `multiprocessing.Pool` did)."""
    (tmp_path / "a.cif").write_text(make_cif([("C1", "C", 0, 0, 0)]))
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from cryknn.datasets.crystal_structures import parsing\n"
        f"tasks = list(parsing.file_tasks({str(tmp_path)!r}))\n"
        "print(len(list(parsing.Parser(2).parse(tasks))))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=subprocess_env(), cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "parsing worker process died" in r.stderr and "__main__" in r.stderr, r.stderr[-3000:]


def test_closing_the_parser_mid_build_stops_its_workers(tmp_path):
    for i in range(40):
        (tmp_path / f"s{i:02d}.cif").write_text(make_cif([("C1", "C", 0, 0, 0)]))
    parser = parsing.Parser(2, chunk_size=2)
    results = parser.parse(parsing.file_tasks(str(tmp_path)))
    assert next(results)[0].endswith("s00.cif")
    workers = list(parser._pool._processes.values())
    parser.close()  # chunks still in flight
    assert workers and not any(_running(w) for w in workers)


def _running(worker) -> bool:
    """Whether a worker process still runs. The pool's manager thread may reap a worker
    before `Process.is_alive` has seen it exit (it then still says True for a moment), so
    on Linux ask the kernel: no /proc entry, or a zombie, is not running."""
    if not os.path.isdir("/proc"):  # not Linux
        worker.join(5)
        return worker.is_alive()
    try:
        with open(f"/proc/{worker.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_missing_split_is_left_out(tmp_path):
    root = tmp_path / "cifs"
    root.mkdir()
    ref = _refcode_in("train")
    (root / f"{ref}.cif").write_text(_cif(ref, [("Fe1", "Fe", 0, 0, 0)]))
    datasets.build("crystal_structures/cif_dir", str(tmp_path / "tfds"), manual_dir=str(root),
               num_workers=0, log=lambda _: None)
    assert [ex["id"] for ex in datasets.load_split("crystal_structures/cif_dir", "train",
                                               str(tmp_path / "tfds"))] == [f"{ref}:{ref}"]
    with pytest.raises(errors.DataError, match="no 'test' split"):
        next(datasets.load_split("crystal_structures/cif_dir", "test", str(tmp_path / "tfds")))
    stats = datasets.element_stats("crystal_structures/cif_dir", str(tmp_path / "tfds"))
    assert list(stats["splits"]) == ["train"]


def test_errors(tmp_path):
    with pytest.raises(errors.DataError, match="manual_dir"):
        datasets.build("crystal_structures/cif_dir", str(tmp_path))
    with pytest.raises(errors.DataError, match="not a directory"):
        datasets.build("crystal_structures/cif_dir", str(tmp_path), manual_dir=str(tmp_path / "no"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.DataError, match=r"no \*\.cif files"):
        datasets.build("crystal_structures/cif_dir", str(tmp_path / "d"),
                   manual_dir=str(tmp_path / "empty"))
    with pytest.raises(errors.DataError, match="not built"):
        datasets.element_stats("crystal_structures/core_mof_2014", str(tmp_path))
    with pytest.raises(errors.DataError, match="not built"):
        next(datasets.load_split("crystal_structures/core_mof_2014", "train", str(tmp_path),
                             build_if_missing=False))
    with pytest.raises(errors.DataError, match="unknown split"):
        next(datasets.load_split("crystal_structures/core_mof_2014", "dev", str(tmp_path)))


# --------------------------------------------------------------------------------------
# The core-mof configs, on the first archive members (the `limit` builder kwarg).

LIMIT = 40


def test_core_mof_limited_build(tmp_path):
    data_dir = str(tmp_path)
    datasets.build("crystal_structures/core_mof_2019_asr", data_dir, limit=LIMIT, num_workers=0,
               log=lambda _: None)
    expected = list(cif.iter_core_mof("2019-ASR", limit=LIMIT))
    want = {s.id: s for s in expected if isinstance(s, cif.Structure)}
    examples = _examples("crystal_structures/core_mof_2019_asr", data_dir,
                         splits=[s for s in families.SPLITS if s in _built_splits(data_dir)])
    got = {ex["id"]: (split, ex) for split, exs in examples.items() for ex in exs}
    assert sorted(got) == sorted(want)
    for sid, (split, ex) in got.items():
        assert split == families.split_of_id(sid)
        assert ex["source"] == want[sid].source
        np.testing.assert_array_equal(ex["frac"], want[sid].frac)
        np.testing.assert_array_equal(ex["numbers"], want[sid].numbers)
    info = datasets.read_build_info(_dataset_dir(data_dir, "core_mof_2019_asr"))
    assert info["limit"] == LIMIT and sum(info["files"].values()) == LIMIT
    split_sets = collections.defaultdict(set)
    for split, exs in examples.items():
        for ex in exs:
            split_sets[ex["family"]].add(split)
    assert all(len(s) == 1 for s in split_sets.values())
    with pytest.raises(errors.DataError, match="limit"):
        datasets.build("crystal_structures/core_mof_2019_asr", data_dir, limit=LIMIT + 1)


def _built_splits(data_dir):
    with open(os.path.join(_dataset_dir(data_dir, "core_mof_2019_asr"),
                           datasets.ELEMENT_STATS_JSON)) as f:
        return json.load(f)["splits"]


def test_limit_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV_LIMIT, "5")
    builder = datasets.get_builder("crystal_structures/core_mof_2014", str(tmp_path))
    assert builder._limit == 5


# --------------------------------------------------------------------------------------
# The CLI: bad arguments give one line and a non-zero exit; build and stats work.


def _cli(*args, timeout=180):
    return run_module("cryknn.data", *args, timeout=timeout)


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["build", "stats"],
    ["build", "--dataset=crystal_structures/no_such_config"],
    ["build", "--dataset=mnist"],
    ["build", "--dataset=crystal_structures/cif_dir"],
    ["build", "--dataset=crystal_structures/cif_dir", "--manual_dir=/no/such/dir"],
    ["build", "--data_dir=/no/such/dir/tfds"],
    ["stats", "--data_dir=/no/such/dir"],
    ["build", "--no_such_flag=1"],
    ["build", "--limit=0"],
])
def test_cli_bad_arguments(args):
    result = _cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_cli_stats_of_unbuilt_dataset(tmp_path):
    result = _cli("stats", "--dataset=crystal_structures/core_mof_2014", f"--data_dir={tmp_path}")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "not built" in lines[0], result.stderr


def _cli_build_job(folder):
    """`cryknn.data build` of a folder of CIFs (written at collection), then `stats` of it."""
    root, data_dir = folder / "cifs", folder / "tfds"
    root.mkdir()
    write_cif_folder(str(root))
    dataset = "--dataset=crystal_structures/cif_dir"
    return side_lane.commands_job(folder, [
        [sys.executable, "-m", "cryknn.data", "build", dataset, f"--manual_dir={root}",
         f"--data_dir={data_dir}", "--num_workers=0"],
        [sys.executable, "-m", "cryknn.data", "stats", dataset, f"--data_dir={data_dir}",
         f"--out={folder / 'chart.png'}"]], subprocess_env(), REPO, side_by_side=False)


@pytest.mark.slow  # two subprocesses that import TensorFlow
@pytest.mark.side_lane(job=_cli_build_job)
def test_cli_build_and_stats(side_job):
    build, stats = side_job.commands()
    assert build.returncode == 0, build.stderr
    assert "skipped: 2 blocks or files" in build.stdout
    assert stats.returncode == 0, stats.stderr
    assert "train atoms" in stats.stdout and "\nNa " in stats.stdout
    assert (side_job.folder / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# Apache Beam (DirectRunner): same examples, skip report and statistics as a local build.


def test_beam_build_matches_local(cif_build, tmp_path):
    pytest.importorskip("apache_beam")
    root, data_dir, _ = cif_build
    beam_dir = str(tmp_path)
    datasets.build("crystal_structures/cif_dir", beam_dir, manual_dir=root,
               beam_runner="DirectRunner", log=lambda _: None)
    local = _examples("crystal_structures/cif_dir", data_dir)
    beam = _examples("crystal_structures/cif_dir", beam_dir)
    for split in families.SPLITS:
        assert sorted(e["id"] for e in beam[split]) == sorted(e["id"] for e in local[split])
    local_dir, beam_ds = _dataset_dir(data_dir, "cif_dir"), _dataset_dir(beam_dir, "cif_dir")
    assert sorted(datasets.read_skips(beam_ds)) == sorted(datasets.read_skips(local_dir))
    assert datasets.element_stats("crystal_structures/cif_dir", beam_dir)["splits"] == \
        datasets.element_stats("crystal_structures/cif_dir", data_dir)["splits"]
    assert datasets.read_build_info(beam_ds)["beam"] is True


def test_archive_shards_parse_each_structure_of_their_split_once():
    """What a Beam worker does with a core-mof archive (`parsing.beam_parse` of an
    `ArchiveShard`): the shards of a split parse its structures, each exactly once. The
    pipeline around it is the one `test_beam_build_matches_local` runs end to end."""
    pytest.importorskip("apache_beam")
    limit = 30
    want = collections.defaultdict(list)
    for task in parsing.core_mof_tasks("2014", limit=limit):
        want[task.split(None)] += [f"{task.source}#{i}" for i, r in
                                   enumerate(parsing.parse_task(task))
                                   if isinstance(r, cif.Structure)]
    for shards in (1, 3):
        for split in families.SPLITS:
            keys = [out[0] for shard in range(shards) for out in parsing.beam_parse(
                [parsing.ArchiveShard("2014", split, shard, shards, limit)])
                if isinstance(out, tuple)]
            assert sorted(keys) == sorted(want[split]), (shards, split)
    assert sum(map(len, want.values())) > 20