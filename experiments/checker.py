"""Benchmark of the structure checker: false alarms on real structures, single Z+-1 swaps
caught, calibration, on the test split and on held-out COD.

    python experiments/checker.py [--data_dir=D] [--cifs=../shared/data/cod]
        [--json=docs/runs/checker.json] [--figures=docs/figures] [--max_structures=N]
        [--validation]
    python experiments/checker.py --cifs=FOLDER --cifs_name=core_mof_2014 \
        --json=docs/runs/checker_core_mof_2014.json --figures=docs/figures/core_mof_2014
        # FOLDER from experiments/core_mof_unseen.py: fresh CoRE MOF frameworks

For each shipped model (`default`, `masked`, `masked_ensemble`; calibrated by
experiments/calibrate.py or train_pretrained.py, which also chose each one's checking
rule on validation: `scoring.CheckRule`) and each set of real structures
(the test split of the models' dataset; the COD CIFs beside the repository without the
near-copies of any structure of the training dataset build, `heldout.py`):
- real sites flagged implausible, real structures with any flagged site, sites outside the
  model's domain and structures mostly outside it;
- one Z+-1 swap per structure (`cryknn.checking.SWAP_PAIRS`: C<->N<->O, O<->F, P<->S<->Cl,
  Mn..Zn neighbours, Ag<->Cd<->In; the site and partner drawn with --seed): the share of
  swapped structures with a flagged site (detection), per swap pair too;
- ROC AUC of swapped against real sites and structures (score: the rule's site score,
  `CheckRule.score`, a structure's least over its sites in the domain);
- each with the model's checking rule, and with p(given) < 0.05 alone (the old default);
  95 % family-bootstrap intervals of the shares of real structures flagged and of swaps
  caught (test: near-copy groups of the build's splits.csv; COD: each structure alone);
- expected calibration error before and after temperature scaling, reliability diagrams,
  and detection against the structure false-alarm rate with the rule's thresholds scaled
  together from 1/1000 to 30 times (figures).
Also, per model and set, where the false alarms are (`false_alarms`). --validation adds
the validation split, where the rules were fitted. --max_structures draws that many
structures of each set (fixed seed) when set.
Nothing here feeds back into any choice: thresholds and temperatures come from validation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ("default", "masked", "masked_ensemble")
OLD_THRESHOLD = 0.05


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data_dir", None, "Where the models' dataset is built (its test "
                        "split's feature cache, fingerprints.npz).")
    flags.DEFINE_string("cifs", str(common.DEFAULT_COD), "Held-out CIF folder ('' to skip).")
    flags.DEFINE_string("cifs_name", "cod", "The held-out set's name in the output (e.g. "
                        "core_mof_2014 for experiments/core_mof_unseen.py's folder).")
    flags.DEFINE_string("json", None, "Write the results here.")
    flags.DEFINE_string("figures", str(common.FIGURES), "Folder for the figures.")
    flags.DEFINE_integer("max_structures", None, "Draw at most this many structures of each "
                         "set (seeded).")
    flags.DEFINE_integer("seed", 0, "Seed of the swaps and of the structure draw.")
    flags.DEFINE_bool("validation", False, "Also measure on the validation split (where the "
                      "rules were fitted: a check of the fit, not a result).")


def subset(table, count: int | None, seed: int):
    """The table restricted to `count` random structures (all when None or fewer)."""
    import dataclasses

    n = len(table.structure_id)
    if count is None or count >= n:
        return table
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, count, replace=False)] = True
    rows = np.flatnonzero(keep[table.structure_index])
    new_row = np.full(len(table), -1)
    new_row[rows] = np.arange(len(rows))
    new_structure = np.cumsum(keep) - 1
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    site = None if table.site is None else np.unique(table.site[rows], return_inverse=True)[1]
    return dataclasses.replace(
        table, distances=table.distances[rows],
        neighbour_index=new_row[table.neighbour_index[rows]].astype(np.int32),
        atomic_number=table.atomic_number[rows],
        structure_index=new_structure[table.structure_index[rows]].astype(np.int32),
        site_label=table.site_label[rows], structure_id=table.structure_id[keep], site=site,
        neighbour_vector=pick(table.neighbour_vector))


def test_table(model, data_dir, split: str = "test"):
    from cryknn import features

    return features.load_features(
        model.saved.config.dataset, split, model.k, data_dir=data_dir,
        fingerprint=model.saved.info["dataset_fingerprint"], log=lambda m: None)


def cod_table(model, cifs: str, data_dir):
    """(table of the held-out COD structures, what was left out)."""
    import heldout

    from cryknn import features, neighbours

    structures, skips = common.read_structures("cod", None, cifs)
    structures, unusable = neighbours.split_featurizable(structures)
    structures, copies = heldout.without_copies_of_training(model, structures, data_dir)
    kept, found, bad = neighbours.featurize_isolated(structures, model.k)
    left_out = {"skipped": len(skips) + len(unusable) + len(bad),
                "near_copies_of_training": len(copies)}
    return features.table_from(kept, found, model.k), left_out


def calibration_figures(model, table, probs) -> dict:
    """ECE before (T = 1) and after temperature scaling, with what the diagram needs."""
    from cryknn import calibration, checking

    p_given = checking.p_given_atoms(model, probs, table.atomic_number)
    rows = np.flatnonzero(np.isfinite(p_given))
    class_of = np.full(119, -1)
    class_of[model.saved.atomic_numbers] = np.arange(len(model.elements))
    labels = class_of[table.atomic_number[rows]]
    after = probs[rows]
    before = calibration.apply_temperature(after, 1.0 / model.temperature)
    return {"temperature": model.temperature, "atoms": int(len(rows)),
            "ece_before": calibration.expected_calibration_error(before, labels),
            "ece_after": calibration.expected_calibration_error(after, labels),
            "curves": {"before": (before, labels), "after": (after, labels)}}


def mostly_outside(model, table) -> float:
    """Share of the table's structures with more than half their atoms outside the domain."""
    from cryknn import site_scores

    outside = ~model.in_domain(table)
    n = len(table.structure_id)
    share = (np.bincount(table.structure_index, outside, n)
             / np.maximum(np.bincount(table.structure_index, minlength=n), 1))
    return float(np.mean(share > site_scores.MOSTLY_OUTSIDE))


def evaluate(model, table, seed: int, groups: np.ndarray) -> tuple[dict, dict]:
    """(results, reliability curves) of one model on one set of real structures, groups
    (S,) the near-copy group of each structure (for the intervals)."""
    from cryknn import checking, evaluate as evaluate_lib

    start = time.time()
    probs = model.predict_table(table)
    run = checking.CheckRun.of(model, table, probs, seed=seed)
    pairs, caught = run.pairs(), run.swapped_min(model.rule) < 1
    calib = calibration_figures(model, table, probs)
    result = {
        "at_checking_threshold": run.summary(model.rule),
        "intervals": {
            "real_structures_flagged": evaluate_lib.share_interval(
                run.structure_min(model.rule) < 1, groups),
            "swap_detection": evaluate_lib.share_interval(
                caught, groups[run.swapped_structure])},
        "at_0.05": run.rates(OLD_THRESHOLD),
        "structures_mostly_outside_domain": mostly_outside(model, table),
        "detection_by_pair": {p: {"swaps": int((pairs == p).sum()),
                                  "detected": float(caught[pairs == p].mean())}
                              for p in sorted(set(pairs.tolist()))},
        "curve": run.curve(model.rule),
        "false_alarms": false_alarms(run, model.rule, groups),
        "calibration": {k: v for k, v in calib.items() if k != "curves"},
        "seconds": round(time.time() - start, 1)}
    return result, calib["curves"]


def false_alarms(run, rule, groups: np.ndarray, top: int = 5) -> dict:
    """Where the real structures flagged are: the element of each one's least plausible
    site, how many were flagged by the Z+-1 ratio (not the p(given) floor alone), and the
    near-copy groups with the most flagged structures (flagged, of how many)."""
    import collections

    from cryknn import elements

    scores = run.scores(rule)
    flagged = run.structure_min(rule) < 1
    order = np.lexsort((scores, run.site_structure))  # by structure, then score
    first = np.r_[True, np.diff(run.site_structure[order]) != 0]
    worst = np.full(run.structures, -1)
    worst[run.site_structure[order[first]]] = order[first]
    sites = worst[flagged]
    by_ratio = (run.site_ratio[sites] < rule.adjacent_threshold
                if rule.adjacent_threshold is not None else np.zeros(len(sites), bool))
    size = collections.Counter(groups.tolist())
    return {"structures": int(flagged.sum()),
            "least_plausible_site_element": dict(collections.Counter(
                elements.symbol(int(z)) for z in run.site_number[sites]).most_common()),
            "flagged_by_adjacent_ratio": int(by_ratio.sum()),
            "groups_most_flagged": [[g, n, size[g]] for g, n in collections.Counter(
                groups[flagged].tolist()).most_common(top)]}


def plot_detection(results: dict, path: str) -> None:
    """Swap detection against the share of real structures flagged, the rule's thresholds
    scaled together; the checking rule's point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for (name, where), r in results.items():
        curve, point = r["curve"], r["at_checking_threshold"]
        line, = ax.plot(curve["real_structures_flagged"], curve["swap_detection"],
                        ls="-" if where == "test" else "--", label=f"{name}, {where}")
        ax.plot(point["real_structures_flagged"], point["swap_detection"], "o",
                color=line.get_color())
    ax.axvline(0.05, color="0.6", lw=0.8)
    ax.axhline(0.9, color="0.6", lw=0.8)
    ax.set(xscale="log", xlim=(1e-3, 1), ylim=(0, 1.01),
           xlabel="real structures with a flagged site", ylabel="single Z±1 swaps caught",
           title="Checker: detection vs false alarms (dots: checking rule)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    rows = []
    for (name, where), r in results.items():
        a, old = r["at_checking_threshold"], r["at_0.05"]
        rows.append({
            "model": name, "set": where, "structures": a["structures"],
            "threshold": f"{a['threshold']:.2g}" + (
                f", adjacent {a['adjacent_threshold']:.2g}" if "adjacent_threshold" in a
                else ""),
            "real sites flagged": f"{a['real_sites_flagged']:.2%}",
            "real structures flagged": f"{a['real_structures_flagged']:.1%} "
                                       + _bracket(r["intervals"]["real_structures_flagged"]),
            "swaps caught": f"{a['swap_detection']:.1%} "
                            + _bracket(r["intervals"]["swap_detection"]),
            "at 0.05: flagged / caught": f"{old['real_structures_flagged']:.1%} / "
                                         f"{old['swap_detection']:.1%}",
            "AUC site / structure": f"{a['site_auc']:.3f} / {a['structure_auc']:.3f}",
            "sites outside domain": f"{a['sites_outside_domain']:.1%}",
            "ECE before / after": f"{r['calibration']['ece_before']:.3f} / "
                                  f"{r['calibration']['ece_after']:.3f}"})
    return common.markdown_table(rows, list(rows[0]))


def _bracket(bounds) -> str:
    return "" if bounds is None else f"[{bounds[0]:.1%}, {bounds[1]:.1%}]"


def structure_groups(model, table, data_dir) -> np.ndarray:
    """(S,) the near-copy group of each structure of the table (its own id where the
    build has none, as for COD)."""
    from cryknn import input_pipeline

    groups = input_pipeline.structure_groups(model.saved.config.dataset, data_dir)
    return np.asarray([groups.get(sid, sid) for sid in table.structure_id.tolist()], str)


def main(argv: Sequence[str]) -> int:
    from absl import flags

    from cryknn import calibration, scoring

    FLAGS = flags.FLAGS
    models = {name: scoring.load_model(name=name) for name in MODELS}
    first = models[MODELS[0]]
    sets = {"test": subset(test_table(first, FLAGS.data_dir), FLAGS.max_structures,
                           FLAGS.seed)}
    if FLAGS.validation:
        sets["validation"] = subset(test_table(first, FLAGS.data_dir, "validation"),
                                    FLAGS.max_structures, FLAGS.seed)
    left_out = {}
    if FLAGS.cifs:
        table, left_out = cod_table(first, FLAGS.cifs, FLAGS.data_dir)
        sets[FLAGS.cifs_name] = subset(table, FLAGS.max_structures, FLAGS.seed)
    results, curves = {}, {}
    for where, table in sets.items():
        for name, model in models.items():
            results[name, where], found = evaluate(
                model, table, FLAGS.seed, structure_groups(first, table, FLAGS.data_dir))
            curves.setdefault(where, {}).update({f"{name} {k}": v for k, v in found.items()})
            print(f"{name} on {where}: {results[name, where]['seconds']} s", flush=True)
    figures = Path(FLAGS.figures)
    figures.mkdir(parents=True, exist_ok=True)
    plot_detection(results, str(figures / "checker_detection.png"))
    for where, found in curves.items():
        calibration.plot_reliability(found, str(figures / f"reliability_{where}.png"),
                                     f"Reliability on {where} (modelled atoms)")
    print(markdown(results))
    if FLAGS.json:
        common.write_json(FLAGS.json, {
            "models": {name: m.describe() for name, m in models.items()},
            "checking_default": scoring.checking_default(), "seed": FLAGS.seed,
            "max_structures": FLAGS.max_structures, "cod_left_out": left_out,
            "results": {f"{name}/{where}": r for (name, where), r in results.items()}})
    return 0


if __name__ == "__main__":
    from cryknn.cli import command

    command.run_tool(main, usage=__doc__, module="experiments/checker.py",
                     define_flags=define_flags)
