"""Embedded data sets (cryknn.cif.sources): CoRE MOF archives and pyxtal's database."""

from pathlib import Path

import numpy as np
import pytest

from cryknn import cif
from cryknn import errors
from cryknn.cif import Structure
from cryknn.cif import sources
from tests.conftest import check_structure



def test_core_mof_sample():
    try:
        items = list(cif.iter_core_mof("2019-ASR", limit=50))
    except errors.DataNotFoundError:
        pytest.skip("core-mof is not installed")
    found = [i for i in items if isinstance(i, Structure)]
    assert len(items) >= 50 and len(found) >= 45
    sources = {i.source if isinstance(i, Structure) else i.file for i in items}
    assert len(sources) == 50
    for s in found:
        check_structure(s)
        archive, member = s.source.split("!")
        assert archive == "2019-ASR.tar.xz"
        assert s.id.split(":")[0] == Path(member).stem
    assert len({s.id for s in found}) == len(found)


def test_core_mof_errors():
    with pytest.raises(errors.DataNotFoundError, match="unknown CoRE MOF version"):
        next(cif.iter_core_mof("2020"))


def test_missing_packages_raise_data_not_found(monkeypatch):
    real_find_spec = sources.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("CoRE_MOF", "pyxtal") else real_find_spec(name, *args)
    monkeypatch.setattr(sources.importlib.util, "find_spec", find_spec)
    with pytest.raises(errors.DataNotFoundError, match="pip install core-mof"):
        next(cif.iter_core_mof())
    with pytest.raises(errors.DataNotFoundError, match="pip install pyxtal"):
        cif.read_pyxtal_db()


def test_pyxtal_db():
    try:
        found = cif.read_pyxtal_db()
    except errors.DataNotFoundError:
        pytest.skip("pyxtal is not installed")
    assert len(found) == 100
    assert len({s.id for s in found}) == 100
    assert all(s.id.startswith("test:") for s in found)
    for s in found:
        check_structure(s)
    ase_db = pytest.importorskip("ase.db")
    with ase_db.connect(str(cif.pyxtal_db_path())) as db:
        atoms = db.get(id=1).toatoms()
    first = found[0]
    np.testing.assert_array_equal(first.numbers, atoms.numbers)
    np.testing.assert_allclose(first.lattice, atoms.cell[:])
    np.testing.assert_allclose(first.frac, atoms.get_scaled_positions(wrap=True) % 1.0,
                               atol=1e-9)
