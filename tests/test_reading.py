"""The reading loop of the tools (cryknn.reading): one entry per file, every skip with its
reason, progress per file, and `read_files`' report built from it."""

from __future__ import annotations

import os

from cryknn import reading
from tests.conftest import METHANE_CIF, NACL_CIF


def test_iter_read_gives_each_file_its_structures_and_skips(tmp_path):
    (tmp_path / "a_nacl.cif").write_text(NACL_CIF)
    (tmp_path / "b_broken.cif").write_text("data_x\n_cell_length_a 5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c_methane.cif").write_text(METHANE_CIF)
    calls = []
    found = list(reading.iter_read([str(tmp_path)], progress=lambda *a: calls.append(a)))
    assert calls == [(1, 3)] * 3
    by_name = {os.path.basename(path): (good, skips) for path, good, skips in found}
    assert sorted(by_name) == ["a_nacl.cif", "b_broken.cif", "c_methane.cif"]
    assert [s.num_atoms for s in by_name["a_nacl.cif"][0]] == [8]
    assert by_name["b_broken.cif"][0] == [] and by_name["b_broken.cif"][1][0].reason


def test_read_files_reports_what_iter_read_found(tmp_path):
    (tmp_path / "nacl.cif").write_text(NACL_CIF)
    (tmp_path / "empty.cif").write_text("")
    report = reading.read_files([str(tmp_path)])
    structures, messages, all_read = report
    assert report.files == 2 and report.not_read == 1 and not all_read
    assert [s.id for s in structures] == ["nacl:nacl"]
    assert len(messages) == 1 and "empty.cif: not read" in messages[0]
