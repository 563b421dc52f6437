"""Small helpers (cryknn.util): one-line messages, chunking, atomic writes that leave
nothing behind on failure, strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from cryknn import util


def test_one_line_folds_white_space_and_cuts():
    assert util.one_line("a\n  b\tc") == "a b c"
    assert util.one_line("x" * 50, limit=10) == "x" * 7 + "..."


def test_chunked_keeps_order_and_a_short_last_chunk():
    assert list(util.chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(util.chunked([], 3)) == []


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with util.atomic_open(str(path), "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with util.atomic_open(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new"


def test_json_is_strict_non_finite_numbers_become_null(tmp_path):
    path = tmp_path / "m.json"
    util.write_json(str(path), {"a": math.nan, "b": [1.0, math.inf], "c": 2})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [1.0, None], "c": 2}
