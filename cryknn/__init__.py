"""cryknn: predict the element of every atom in a crystal from its exact periodic k-NN distances.

  import cryknn
  model = cryknn.load_model()             # the shipped model; load_model(workdir) for yours
  structures = cryknn.read("x.cif")       # CIF natively; POSCAR, extxyz, ... through ase
  model.predict_proba(structures)         # (num_atoms, num_classes) per structure
  model.check(structures).to_pandas()     # one row per site, as `cryknn predict` prints
  cryknn.knn(structures, k=5)             # exact periodic k-NN: distances, neighbours, vectors

Every call takes one structure or a list: cryknn Structures, ase.Atoms or pymatgen
Structures. `cryknn.read` raises FileNotFoundError for a path that does not exist.

Names are imported on first use, so `import cryknn` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "Structure": ("cryknn.cif", "Structure"),
    "Structures": ("cryknn.reading", "Structures"),
    "read": ("cryknn.reading", "read"),
    "knn": ("cryknn.reading", "knn"),
    "load_model": ("cryknn.scoring", "load_model"),
    "Model": ("cryknn.scoring", "Model"),
    "UserError": ("cryknn.errors", "UserError"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'cryknn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
