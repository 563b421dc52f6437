"""The Python API: cryknn.read, Structure.from_ase / from_pymatgen / to_ase, cryknn.knn,
load_model().predict_proba / score, one row per site, and a cheap `import cryknn`."""

import sys

import numpy as np
import pytest

import cryknn
from cryknn import errors
from cryknn import cif
from tests.conftest import METHANE_CIF, NACL_CIF, run_python

def test_import_is_cheap():
    r = run_python("import sys, cryknn; heavy = {'jax', 'tensorflow', 'flax', 'gemmi'} & "
                   "set(sys.modules); assert not heavy, heavy; print('ok')")
    assert r.stdout.strip() == "ok", r.stderr


def test_read_keeps_what_it_skipped(tmp_path):
    (tmp_path / "nacl.cif").write_text(NACL_CIF)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.cif").write_text("not a CIF\n")
    found = cryknn.read(tmp_path)
    assert isinstance(found, cryknn.Structures) and len(found) == 1
    assert [s.id for s in found] == ["nacl:nacl"] and found[0].num_atoms == 8
    assert len(found.skips) == 1 and "broken.cif" in found.skips[0].file


def test_ase_round_trip_gives_identical_probabilities(toy_workdir, tmp_path):
    ase = pytest.importorskip("ase")
    ase_io = pytest.importorskip("ase.io")
    (tmp_path / "methane.cif").write_text(METHANE_CIF)
    (from_cif,) = cryknn.read(tmp_path / "methane.cif")
    atoms = from_cif.to_ase()
    assert isinstance(atoms, ase.Atoms) and len(atoms) == 7
    from_ase = cryknn.Structure.from_ase(atoms, id="methane:methane")
    np.testing.assert_allclose(from_ase.frac, from_cif.frac, atol=1e-12)
    model = cryknn.load_model(toy_workdir)
    (p_cif,), (p_ase,) = model.predict_proba([from_cif]), model.predict_proba([from_ase])
    np.testing.assert_allclose(p_ase, p_cif, atol=1e-6)
    assert p_cif.shape == (7, len(model.elements))
    # and ase's own file formats, through cryknn.read
    ase_io.write(tmp_path / "POSCAR", atoms, format="vasp")
    (from_poscar,) = cryknn.read(tmp_path / "POSCAR", format="vasp")
    np.testing.assert_allclose(model.predict_proba([from_poscar])[0], p_cif, atol=1e-5)


def test_from_pymatgen(toy_workdir):
    pymatgen = pytest.importorskip("pymatgen.core")
    lattice = pymatgen.Lattice.cubic(6.0)
    s = pymatgen.Structure(lattice, ["C", "H", "O"], [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6],
                                                      [0, 0, 0]])
    converted = cryknn.Structure.from_pymatgen(s)
    assert converted.numbers.tolist() == [6, 1, 8] and converted.num_sites == 3
    (probs,) = cryknn.load_model(toy_workdir).predict_proba([converted])
    assert probs.shape == (3, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_missing_ase_is_one_readable_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ase", None)
    monkeypatch.setitem(sys.modules, "ase.io", None)
    (tmp_path / "POSCAR").write_text("whatever\n")
    with pytest.raises(errors.DataError, match=r"pip install 'cryknn\[ase\]'") as e:
        cryknn.read(tmp_path / "POSCAR")
    assert "\n" not in str(e.value)
    with pytest.raises(errors.UserError, match="ase"):
        cif.Structure.from_arrays(
            np.eye(3), np.zeros((1, 3)), [6]).to_ase()


def test_knn():
    found, _ = cif.read_cif_text(NACL_CIF, "nacl")
    (nb,) = cryknn.knn(found, k=6)
    np.testing.assert_allclose(nb.distances, 2.82, atol=1e-4)
    assert nb.indices.shape == (8, 6)
    # Rock salt: each atom's six neighbours sit at +-a/2 along the three axes.
    assert nb.vectors.shape == (8, 6, 3) and nb.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(nb.vectors, axis=-1), nb.distances, atol=1e-5)
    np.testing.assert_allclose(nb.vectors.sum(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(nb.vectors).max(axis=-1), 2.82, atol=1e-4)
