"""Write a benchmark corpus as a folder of CIFs, for timing the featurize CLI end to end.

  python experiments/corpus_cifs.py --source=core_mof --num_structures=1000 --out=/tmp/mof
  python experiments/corpus_cifs.py --source=pyxtal --out=/tmp/pyxtal

core_mof: the archive members holding the first --num_structures readable structures
(the ones experiments/bench_featurize.py times), copied byte for byte. pyxtal: its 100
CSD crystals written as P1 CIFs (cell, element symbols, fractional coordinates). The
third corpus, COD, already is a folder (../shared/data/cod).
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from absl import app, flags
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryknn import elements  # noqa: E402
from cryknn import neighbours  # noqa: E402
from cryknn import cif  # noqa: E402
from cryknn import errors  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "core_mof", ["core_mof", "pyxtal"], "Corpus to write.")
flags.DEFINE_integer("num_structures", 1000, "core_mof: readable structures to cover.")
flags.DEFINE_string("out", None, "Folder to write (created).", required=True)


def _usable(items) -> int:
    count = 0
    for item in items:
        if isinstance(item, cif.Structure):
            try:
                neighbours.validate_cell(item.lattice, item.frac)
                count += 1
            except errors.FeaturizeError:
                pass
    return count


def write_core_mof(out: Path, count: int) -> int:
    archive = cif.core_mof_archive("2019-ASR")
    found = files = 0
    for member, data in cif.iter_tar_cifs(archive):
        stem = PurePosixPath(member).stem
        (out / f"{stem}.cif").write_bytes(data)
        files += 1
        found += _usable(cif.read_cif_text(data, stem)[0])
        if found >= count:
            break
    return files


def p1_cif(s: cif.Structure) -> str:
    a, b, c = np.linalg.norm(s.lattice, axis=1)
    cos = [np.dot(s.lattice[1], s.lattice[2]) / (b * c), np.dot(s.lattice[0], s.lattice[2])
           / (a * c), np.dot(s.lattice[0], s.lattice[1]) / (a * b)]
    alpha, beta, gamma = np.degrees(np.arccos(cos))
    name = s.id.split(":")[-1]
    lines = [f"data_{name}", f"_cell_length_a {a:.8f}", f"_cell_length_b {b:.8f}",
             f"_cell_length_c {c:.8f}", f"_cell_angle_alpha {alpha:.8f}",
             f"_cell_angle_beta {beta:.8f}", f"_cell_angle_gamma {gamma:.8f}",
             "_symmetry_space_group_name_H-M 'P 1'", "loop_", "_atom_site_label",
             "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y",
             "_atom_site_fract_z"]
    for i, (z, f) in enumerate(zip(s.numbers, s.frac % 1.0)):
        symbol = elements.symbol(int(z))
        lines.append(f"{symbol}{i + 1} {symbol} {f[0]:.10f} {f[1]:.10f} {f[2]:.10f}")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    if FLAGS.source == "core_mof":
        files = write_core_mof(out, FLAGS.num_structures)
    else:
        crystals = cif.read_pyxtal_db()
        for s in crystals:
            (out / f"{s.id.split(':')[-1]}.cif").write_text(p1_cif(s))
        files = len(crystals)
    print(f"wrote {files} CIFs to {out}")


if __name__ == "__main__":
    app.run(main)
