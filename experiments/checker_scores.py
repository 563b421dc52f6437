"""How a site's score and the models behind it were chosen for the checker (validation
only): detection of single Z+-1 swaps at 5 % of real structures flagged, the share
flagged at 90 % detection, and the structure ROC AUC, for each combination.

    python experiments/checker_scores.py --data_dir=D \
        --masked_workdirs=runs/masked_s0,runs/masked_s1,runs/masked_s2 [--max_structures=N]

Models: the masked-atom runs given (uncalibrated, as trained) and the shipped `default`.
Scores of a site: p(given) from the mean (or geometric mean) of the models'
probabilities; p(given) / max p; and p(given) / (p(given) + p(best Z+-1 partner)), which
answers only the Z+-1 question. A structure's score is its least site score over the
sites in the shipped `masked` model's domain. The swaps are `checking.pick_swaps`
(seed 0), as in experiments/checker.py. The table in docs/results.md A0.5 came from this.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data_dir", None, "Where the models' dataset is built.")
    flags.DEFINE_list("masked_workdirs", None, "Finished masked-atom runs (other seeds).")
    flags.DEFINE_integer("max_structures", None, "Draw this many validation structures.")


def model_probs(models: dict, table, swaps, rows) -> dict:
    """{name: (clean (A, C), swapped rows (R, C))} probabilities of every model."""
    changed = swaps.table.atomic_number != table.atomic_number
    out = {}
    for name, model in models.items():
        clean = model.predict_table(table)
        redo = rows if model.spec.neighbour_elements else np.flatnonzero(changed)
        swapped = clean.copy()
        swapped[redo] = model.predict_table(swaps.table, redo)
        out[name] = (clean, swapped[rows])
        print(f"{name}: predicted", flush=True)
    return out


def main(argv: Sequence[str]) -> int:
    from absl import flags

    import checker
    from cryknn import checking, features, saved_model, scoring

    FLAGS = flags.FLAGS
    shipped = scoring.load_model(name="masked")
    table = checker.subset(features.load_features(
        shipped.saved.config.dataset, "validation", shipped.k, data_dir=FLAGS.data_dir,
        fingerprint=shipped.saved.info["dataset_fingerprint"]), FLAGS.max_structures, 0)
    models = {f"masked{i}": scoring.Model(saved_model.load(f"{w}/model"), w)
              for i, w in enumerate(FLAGS.masked_workdirs or [])}
    models["default"] = scoring.load_model(name="default")
    swaps = checking.pick_swaps(table, shipped.saved.atomic_numbers, 0)
    rows = checking.affected_rows(table, swaps.table.atomic_number != table.atomic_number,
                                  shipped.spec.receptive_hops)
    probs = model_probs(models, table, swaps, rows)
    numbers = np.asarray(shipped.saved.atomic_numbers)
    class_of = np.full(119, -1)
    class_of[numbers] = np.arange(len(numbers))
    partner = np.zeros((119, len(numbers)), bool)
    for z, others in checking.partners(list(numbers)).items():
        partner[z, class_of[others]] = True
    site = checking.atom_sites(table)
    first = checking.first_atoms(site)
    sites = len(first)
    p_given = lambda p, z: checking.p_given_atoms(shipped, p, z)  # noqa: E731
    ok = shipped.in_domain(table) & np.isfinite(p_given(probs["default"][0],
                                                        table.atomic_number))
    checkable = checking.site_means(ok.astype(float), site, sites) > 0.999
    structure = table.structure_index[first]

    def least(values):
        mean = checking.site_means(np.nan_to_num(values, nan=1.0), site, sites)
        return checking.least_per_structure(np.where(checkable, mean, np.inf), checkable,
                                            structure, len(table.structure_id))

    scores = {
        "p(given)": p_given,
        "p(given) / max p": lambda p, z: p_given(p, z) / p.max(axis=1),
        "p(given) / (p(given) + p(best Z±1 partner))": lambda p, z: p_given(p, z) / np.maximum(
            p_given(p, z) + np.where(partner[z], p, 0).max(axis=1), 1e-30)}
    combos = [[n] for n in models if n.startswith("masked")]
    masked = [n for n in models if n.startswith("masked")]
    combos += [masked, masked + ["default"]] if len(masked) > 1 else []
    table_rows = []
    thresholds = np.geomspace(1e-7, 0.9, 2000)
    for names in combos:
        for mean_kind in ("mean", "geometric mean"):
            for score_name, score in scores.items():
                if mean_kind == "geometric mean" and score_name != "p(given)":
                    continue
                clean, swapped = (_combine([probs[n][i] for n in names], mean_kind)
                                  for i in (0, 1))
                a = score(clean, table.atomic_number)
                b = a.copy()
                b[rows] = score(swapped, swaps.table.atomic_number[rows])
                real, caught = least(a), least(b)[swaps.structure]
                flagged = np.array([np.mean(real < t) for t in thresholds])
                detected = np.array([np.mean(caught < t) for t in thresholds])
                at_5 = detected[np.flatnonzero(flagged <= 0.05).max()]
                at_90 = flagged[np.flatnonzero(detected >= 0.9).min()]
                table_rows.append({"models": " + ".join(names), "combined by": mean_kind,
                                   "site score": score_name,
                                   "detection at 5 % flagged": f"{at_5:.1%}",
                                   "flagged at 90 % detection": f"{at_90:.1%}",
                                   "structure AUC": f"{checking.roc_auc(-caught, -real):.3f}"})
    print(common.markdown_table(table_rows, list(table_rows[0])))
    return 0


def _combine(probs: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "mean":
        return np.mean(probs, axis=0)
    logs = np.mean([np.log(np.maximum(p, 1e-30)) for p in probs], axis=0)
    e = np.exp(logs - logs.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/checker_scores.py",
                     define_flags=define_flags)
