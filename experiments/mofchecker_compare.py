"""cryknn's checker side by side with mofchecker on the same clean and corrupted CoRE MOF
test structures.

    python experiments/mofchecker_compare.py --mofchecker_python=/work/venv_mofchecker/bin/python
        [--data_dir=D] [--structures=100] [--max_atoms=300] [--json=F]

mofchecker (pip `mofchecker`, K. M. Jablonka et al., https://github.com/kjappelbaum/mofchecker)
runs in its own virtual environment (its pins clash with ours); this script writes the
structures as CIFs and runs itself there with --worker. Structures: --structures drawn
(--seed) from the test split of the shipped models' dataset among those with at most
--max_atoms atoms per cell (mofchecker's graph checks take seconds per structure); the
corrupted copy of each has one Z+-1 swap (`cryknn.checking.pick_swaps`, the same swaps
experiments/checker.py draws with this seed). A structure counts as flagged by mofchecker
when any of its problem checks (CHECKS) says so; by cryknn when its checking rule flags a
site in the domain (`scoring.CheckRule`).

`has_geometrically_exposed_metal` is left out: it needs libconeangle, whose build fetches
the Fortran stdlib from GitHub at build time (not reachable here); the worker stands in a
stub for that import so the other checks run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

# Problem checks of mofchecker 0.9 (descriptors that are True when something is wrong).
CHECKS = ("has_atomic_overlaps", "has_overcoordinated_c", "has_overcoordinated_n",
          "has_overcoordinated_h", "has_undercoordinated_c", "has_undercoordinated_n",
          "has_undercoordinated_rare_earth", "has_undercoordinated_alkali_alkaline",
          "has_lone_molecule", "has_high_charges", "has_suspicicious_terminal_oxo")
LEFT_OUT = ("has_geometrically_exposed_metal",)
TIMEOUT_S = 60


def worker(folder: str, out: str) -> None:
    """In mofchecker's venv: one JSON line per CIF of folder with each check's answer."""
    import signal
    import types
    import warnings

    warnings.filterwarnings("ignore")  # pymatgen's deprecations, once per structure

    try:
        import libconeangle  # noqa: F401
    except ImportError:
        stub = types.ModuleType("libconeangle")

        def cone_angle(*args, **kwargs):
            raise RuntimeError("libconeangle is not installed")

        stub.cone_angle = cone_angle
        sys.modules["libconeangle"] = stub
    from mofchecker import MOFChecker

    def alarm(*_):
        raise TimeoutError(f"over {TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, alarm)
    with open(out, "w") as f:
        for name in sorted(os.listdir(folder)):
            start, found = time.time(), {"file": name}
            signal.alarm(TIMEOUT_S)
            try:
                checker = MOFChecker.from_cif(os.path.join(folder, name))
                for check in CHECKS:
                    try:
                        found[check] = getattr(checker, check)
                    except TimeoutError:
                        raise
                    except Exception as e:  # noqa: BLE001 - one check failing is data
                        found[check] = None
                        found.setdefault("failed", {})[check] = str(e)[:120]
            except Exception as e:  # noqa: BLE001 - a structure it cannot read is data
                found["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            finally:
                signal.alarm(0)
            found["seconds"] = round(time.time() - start, 2)
            f.write(json.dumps(found) + "\n")
            f.flush()


sys.path.insert(0, str(Path(__file__).resolve().parent))
if __name__ != "__main__" or "--worker" not in sys.argv:
    import common  # noqa: E402,F401  (the repository on sys.path)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("mofchecker_python", "/work/venv_mofchecker/bin/python",
                        "Python of a venv with mofchecker installed.")
    flags.DEFINE_string("data_dir", None, "Where the models' dataset is built.")
    flags.DEFINE_integer("structures", 100, "Test structures drawn.")
    flags.DEFINE_integer("max_atoms", 300, "Only structures with at most this many atoms.")
    flags.DEFINE_integer("seed", 0, "Seed of the draw and of the swaps.")
    flags.DEFINE_string("workdir", "/tmp/cryknn_experiments/mofchecker", "CIFs and raw "
                        "mofchecker answers go here.")
    flags.DEFINE_string("json", None, "Write the comparison here.")
    flags.DEFINE_bool("reuse", False, "Reuse mofchecker's answers in --workdir from an "
                      "earlier run with the same flags.")


def draw(data_dir, count: int, max_atoms: int, seed: int, model):
    import numpy as np

    from cryknn import datasets

    found = [s for s in datasets.load_structures(model.saved.config.dataset, "test", data_dir,
                                                 build_if_missing=False)
             if 0 < s.num_atoms <= max_atoms]
    pick = np.random.default_rng(seed).choice(len(found), min(count, len(found)),
                                              replace=False)
    return [found[i] for i in sorted(pick)]


def write_cifs(structures, numbers_of, folder: Path) -> None:
    """P1 CIFs through ase, element of atom j of structure i: numbers_of(i)[j]."""
    import ase.io

    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(structures):
        atoms = s.to_ase()
        atoms.set_atomic_numbers(numbers_of(i))
        ase.io.write(str(folder / f"{i:04d}.cif"), atoms, format="cif")


def run_mofchecker(python: str, folders: list[Path]) -> list[list[dict]]:
    """mofchecker's answers for the CIFs of each folder (one worker per folder, at once)."""
    outs = [folder.with_suffix(".jsonl") for folder in folders]
    workers = [subprocess.Popen([python, __file__, "--worker", str(folder), str(out)],
                                stderr=subprocess.DEVNULL)
               for folder, out in zip(folders, outs)]
    if any(w.wait() for w in workers):
        raise RuntimeError(f"a mofchecker worker failed ({python} {__file__} --worker ...)")
    found = []
    for out in outs:
        with open(out) as f:
            found.append([json.loads(line) for line in f])
    return found


def mofchecker_flags(answers: list[dict]) -> dict:
    """{check: (S,) bool} and 'any' over CHECKS; errors and timeouts count as not flagged."""
    import numpy as np

    out = {check: np.array([bool(a.get(check)) for a in answers]) for check in CHECKS}
    out["any"] = np.any([out[c] for c in CHECKS], axis=0)
    out["error"] = np.array(["error" in a for a in answers])
    return out


def compare(models: dict, table, answers_clean, answers_swapped, seed: int) -> dict:
    """Real structures flagged and swaps caught by mofchecker (any check, each check) and by
    each cryknn model by its checking rule, over the structures that got a swap."""
    import numpy as np

    from cryknn import checking

    rows, swapped = {}, None
    for name, model in models.items():
        run = checking.CheckRun.of(model, table, seed=seed)
        swapped = run.swapped_structure
        real = run.structure_min(model.rule) < 1
        caught = run.swapped_min(model.rule) < 1
        rows[f"cryknn {name}"] = (real[swapped], caught)
    clean, bad = mofchecker_flags(answers_clean), mofchecker_flags(answers_swapped)
    for check in ("any",) + CHECKS:
        rows["mofchecker " + ("(any check)" if check == "any" else check)] = (
            clean[check][swapped], bad[check][swapped])
    for name in models:
        ours = rows[f"cryknn {name}"]
        rows[f"cryknn {name} or mofchecker"] = (ours[0] | clean["any"][swapped],
                                                ours[1] | bad["any"][swapped])
    return {"structures": int(len(swapped)),
            "mofchecker_errors": {"clean": int(clean["error"].sum()),
                                  "swapped": int(bad["error"].sum())},
            "rows": {name: {"real_structures_flagged": float(np.mean(r)),
                            "swap_detection": float(np.mean(c)),
                            "flagged_only_after_swap": float(np.mean(c & ~r))}
                     for name, (r, c) in rows.items()}}


def main(argv: Sequence[str]) -> int:
    from absl import flags

    import common
    from cryknn import checking, features, scoring

    FLAGS = flags.FLAGS
    models = {name: scoring.load_model(name=name) for name in ("default", "masked", "masked_ensemble")}
    first = models["default"]
    structures = draw(FLAGS.data_dir, FLAGS.structures, FLAGS.max_atoms, FLAGS.seed, first)
    table = features.atom_table(structures, first.k)
    swaps = checking.pick_swaps(table, first.saved.atomic_numbers, FLAGS.seed)
    starts = [0]
    for s in structures:
        starts.append(starts[-1] + s.num_atoms)
    work = Path(FLAGS.workdir)
    write_cifs(structures, lambda i: structures[i].numbers, work / "clean")
    write_cifs(structures, lambda i: swaps.table.atomic_number[starts[i]:starts[i + 1]],
               work / "swapped")
    start = time.time()
    folders = [work / "clean", work / "swapped"]
    if FLAGS.reuse and all(f.with_suffix(".jsonl").is_file() for f in folders):
        clean, swapped = ([json.loads(line) for line in open(f.with_suffix(".jsonl"))]
                          for f in folders)
    else:
        clean, swapped = run_mofchecker(FLAGS.mofchecker_python, folders)
    result = compare(models, table, clean, swapped, FLAGS.seed)
    result.update({"seed": FLAGS.seed, "max_atoms": FLAGS.max_atoms,
                   "mofchecker_seconds": round(time.time() - start, 1),
                   "left_out_checks": list(LEFT_OUT), "mofchecker_answers_reused": FLAGS.reuse,
                   "thresholds": {n: checking.rule_record(m.rule)
                                  for n, m in models.items()}})
    rows = [{"checker": name, "real structures flagged": f"{r['real_structures_flagged']:.1%}",
             "single Z±1 swaps caught": f"{r['swap_detection']:.1%}",
             "flagged only after the swap": f"{r['flagged_only_after_swap']:.1%}"}
            for name, r in result["rows"].items()]
    print(f"{result['structures']} CoRE MOF test structures (<= {FLAGS.max_atoms} atoms, "
          f"seed {FLAGS.seed}), each clean and with one swap; mofchecker errors "
          f"{result['mofchecker_errors']}")
    print(common.markdown_table(rows, list(rows[0])))
    if FLAGS.json:
        common.write_json(FLAGS.json, result)
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(*sys.argv[sys.argv.index("--worker") + 1:][:2])
    else:
        from cryknn.cli import command

        command.run_tool(main, usage=__doc__, module="experiments/mofchecker_compare.py",
                         define_flags=define_flags)
