"""How a site's score and the models behind it were chosen for the checker (validation
only): detection of single Z+-1 swaps at 5 % of real structures flagged, the share
flagged at 90 % detection, and the structure ROC AUC, for each combination.

    python experiments/checker_scores.py --data_dir=D \
        --masked_workdirs=runs/masked_s0,runs/masked_s1,runs/masked_s2 [--max_structures=N]
    python experiments/checker_scores.py --data_dir=D --masked_workdirs=T0,T1,T2,G0,G1,G2 \
        --groups=tree:0+1+2,graph:3+4+5    # ensembles of some of the runs, side by side
        [--out_of_fold=20]                 # each one's rule fitted and measured apart

Models: the masked-atom runs given (uncalibrated, as trained) and the shipped `default`.
Scores of a site: p(given) from the mean (or geometric mean) of the models'
probabilities; p(given) / max p; and p(given) / (p(given) + p(best Z+-1 partner)), which
answers only the Z+-1 question. A structure's score is its least site score over the
sites in the shipped `masked` model's domain. --groups names ensembles of some of the runs
(indices into --masked_workdirs), each scored like the ensemble of all of them, on the same
swaps. With several masked runs, also: sites whose runs disagree (mutual information above
a quantile) taken out of the domain; and the checking rule `scoring.CheckRule` (a p(given)
floor that alone flags a given share of the structures, or p(given) / (p(given) + p(Z+-1
neighbour)) below a threshold) fitted by `checking.choose_rule` for several floors. The
swaps are `checking.pick_swaps` (seed 0), as in experiments/checker.py. The rule rows
also give the point fitted for equal margins to both of issue 20's targets (at most 5 %
flagged, at least 90 % caught; `checking.choose_rule` with detection_target). With
--out_of_fold, each named ensemble's rule is also fitted on a random half of validation's
near-copy groups and measured on the other half (`out_of_fold`): what a fit on validation
leaves for new structures, the criterion of docs/runs/checker_more_members_plan.md. The
tables in docs/results.md A0.5 and A0.10 came from this.
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
    flags.DEFINE_list("groups", [], "Ensembles of some of the runs, NAME:I+J+... (indices "
                      "into --masked_workdirs), scored like the mean of all of them.")
    flags.DEFINE_integer("out_of_fold", 0, "Also fit the checking rule on one half of "
                         "validation's near-copy groups and measure it on the other, over "
                         "this many random halvings (each half in turn), per ensemble.")


def parse_groups(specs: Sequence[str], runs: int) -> dict[str, list[int]]:
    """{'tree': [0, 1, 2]} from ['tree:0+1+2']; a clear error for a malformed spec."""
    from cryknn import errors

    groups = {}
    for spec in specs:
        name, _, members = spec.partition(":")
        try:
            index = [int(i) for i in members.split("+")]
        except ValueError:
            index = []
        if not name or not index or not all(0 <= i < runs for i in index):
            raise errors.ConfigError(f"--groups: {spec!r} is not NAME:I+J+... with indices "
                                     f"below {runs} (the --masked_workdirs given)")
        groups[name] = index
    return groups


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
    groups = parse_groups(FLAGS.groups, len(FLAGS.masked_workdirs or []))
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
    site = checking.atom_sites(table)
    first = checking.first_atoms(site)
    sites = len(first)
    p_given = lambda p, z: checking.p_given_atoms(shipped, p, z)  # noqa: E731
    ok = shipped.in_domain(table) & np.isfinite(p_given(probs["default"][0],
                                                        table.atomic_number))
    checkable = checking.site_means(ok.astype(float), site, sites) > 0.999
    structure = table.structure_index[first]

    def least(values, agree=True):
        mean = checking.site_means(np.nan_to_num(values, nan=1.0), site, sites)
        ok = checkable & agree
        return checking.least_per_structure(np.where(ok, mean, np.inf), ok,
                                            structure, len(table.structure_id))

    scores = {
        "p(given)": p_given,
        "p(given) / max p": lambda p, z: p_given(p, z) / p.max(axis=1),
        # NaN where no Z+-1 partner is modelled: never the least (as 1 in `least`)
        "p(given) / (p(given) + p(best Z±1 partner))": lambda p, z: scoring.p_vs_adjacent(
            p, z, numbers)}
    combos = [[n] for n in models if n.startswith("masked")]
    masked = [n for n in models if n.startswith("masked")]
    combos += [masked, masked + ["default"]] if len(masked) > 1 else []
    named = {"masked mean": masked} if len(masked) > 1 else {}
    named.update({name: [masked[i] for i in index] for name, index in groups.items()})
    combos += [names for names in named.values() if names not in combos]
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
    if len(masked) > 1:
        table_rows += disagreement_rows([probs[n] for n in masked], table, swaps, rows,
                                        p_given, least, thresholds)
    runs = {label: ensemble_run([probs[n] for n in names], table, swaps, rows, shipped,
                                checkable) for label, names in named.items()}
    for label, run in runs.items():
        table_rows += rule_rows(run, label)
    print(common.markdown_table(table_rows, list(dict.fromkeys(
        key for row in table_rows for key in row))))
    if FLAGS.out_of_fold and runs:
        groups = checker.structure_groups(shipped, table, FLAGS.data_dir)
        fold_rows = [{"models": label, "members": len(named[label]),
                      **out_of_fold(run, groups, FLAGS.out_of_fold)}
                     for label, run in runs.items()]
        print(f"\nOut of fold: the rule fitted at equal margins on one half of validation's "
              f"near-copy groups, measured on the other ({FLAGS.out_of_fold} random "
              f"halvings, each half in turn; means)")
        print(common.markdown_table(fold_rows, list(fold_rows[0])))
    return 0


def ensemble_run(members: list[tuple], table, swaps, rows, shipped, checkable):
    """The `checking.CheckRun` of the members' mean probabilities (each member's (clean
    (A, C), swapped rows (R, C))), sites checkable as `checkable` (sites,)."""
    from cryknn import checking, scoring

    site = checking.atom_sites(table)
    first = checking.first_atoms(site)
    sites = len(first)
    clean = np.mean([c for c, _ in members], axis=0)
    swapped = clean.copy()
    swapped[rows] = np.mean([r for _, r in members], axis=0)
    numbers = np.asarray(shipped.saved.atomic_numbers)
    before, after = table.atomic_number, swaps.table.atomic_number
    mean = lambda p, z: checking.site_means(np.nan_to_num(  # noqa: E731
        checking.p_given_atoms(shipped, p, z), nan=1.0), site, sites)
    ratio = lambda p, z: scoring.p_vs_adjacent(  # noqa: E731
        checking.site_probs(p, site, sites), z[first], numbers)
    return checking.CheckRun(
        mean(clean, before), before[first], mean(swapped, after), after[first], checkable,
        checkable, table.structure_index[first].astype(np.int64), swaps.site,
        swaps.structure, ratio(clean, before), ratio(swapped, after))


def out_of_fold(run, groups: np.ndarray, repeats: int, seed: int = 0) -> dict:
    """The checking rule (`checking.choose_rule` at equal margins) fitted on a random half
    of the near-copy groups (S,) and measured on the other half, each half in turn, over
    `repeats` halvings: mean shares flagged and caught, the mean smaller margin to the two
    targets, and how often the held-out half flagged more than the target."""
    from cryknn import checking

    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    measured = []
    for _ in range(repeats):
        half = np.isin(groups, rng.choice(names, len(names) // 2, replace=False))
        for fit in (half, ~half):
            rule = checking.choose_rule(run.subset(fit),
                                        detection_target=checking.TARGET_SWAP_DETECTION)
            rates = run.subset(~fit).rates(rule)
            measured.append((rates["real_structures_flagged"], rates["swap_detection"]))
    flagged, caught = np.asarray(measured).T
    margin = np.minimum(checking.TARGET_STRUCTURE_FALSE_ALARMS - flagged,
                        caught - checking.TARGET_SWAP_DETECTION)
    over = np.mean(flagged > checking.TARGET_STRUCTURE_FALSE_ALARMS)
    return {"held-out flagged": f"{flagged.mean():.2%}",
            "held-out caught": f"{caught.mean():.2%}", "margin": f"{margin.mean():+.4%}",
            "halves flagging over 5 %": f"{over:.0%}"}


def rule_rows(run, label: str = "masked mean") -> list[dict]:
    """The masked runs' mean (named `label`, its `checking.CheckRun`) checked by
    `checking.choose_rule` with p(given) floors that alone flag 0-3 % of the real
    structures: detection at 5 % flagged, the share flagged at 90 % detection (the rule's
    two thresholds scaled together), and the rule fitted for equal margins to both
    targets."""
    from cryknn import checking

    out = []
    for floor in (0.0, 0.005, 0.01, 0.02, 0.03):
        rule = checking.choose_rule(run, floor=floor)
        at_5 = run.rates(rule)
        curve = run.curve(rule)
        detected = np.array(curve["swap_detection"])
        flagged = np.array(curve["real_structures_flagged"])
        out.append({"models": f"{label}, p(given) floor flagging {floor:.1%} alone",
                    "combined by": "mean", "site score": "checking rule (floor or "
                    "p(given) / (p(given) + p(Z±1 neighbour)))",
                    "detection at 5 % flagged": f"{at_5['swap_detection']:.1%}",
                    "flagged at 90 % detection":
                        f"{flagged[np.flatnonzero(detected >= 0.9).min()]:.1%}",
                    "structure AUC": f"{run.summary(rule)['structure_auc']:.3f}",
                    "equal margins: flagged / caught": _balanced(run, floor)})
    return out


def _balanced(run, floor: float) -> str:
    """The rule fitted for equal margins to both targets (`checking.choose_rule` with
    detection_target): its shares flagged and caught, and the smaller margin."""
    from cryknn import checking

    rates = run.rates(checking.choose_rule(
        run, floor=floor, detection_target=checking.TARGET_SWAP_DETECTION))
    flagged, caught = rates["real_structures_flagged"], rates["swap_detection"]
    margin = min(checking.TARGET_STRUCTURE_FALSE_ALARMS - flagged,
                 caught - checking.TARGET_SWAP_DETECTION)
    return f"{flagged:.1%} / {caught:.1%} (margin {margin:+.1%})"


def disagreement(member_probs: list[np.ndarray]) -> np.ndarray:
    """(A,) the members' mutual information: entropy of their mean minus their mean
    entropy (0 when they agree)."""
    entropy = lambda p: -np.sum(p * np.log(np.maximum(p, 1e-30)), axis=1)  # noqa: E731
    return entropy(np.mean(member_probs, axis=0)) - np.mean(
        [entropy(p) for p in member_probs], axis=0)


def disagreement_rows(members: list[tuple], table, swaps, rows, p_given, least,
                      thresholds) -> list[dict]:
    """The ensemble mean's p(given), with sites whose members disagree beyond a quantile
    of the real validation sites' disagreement taken out of the domain (never flagged),
    in the clean and in the swapped structures alike."""
    from cryknn import checking

    site = checking.atom_sites(table)
    sites = int(site.max()) + 1
    clean = [c for c, _ in members]
    swapped = [c.copy() for c in clean]
    for s, (_, redo) in zip(swapped, members):
        s[rows] = redo
    spread_clean = checking.site_means(disagreement(clean), site, sites)
    spread_swapped = checking.site_means(disagreement(swapped), site, sites)
    a = p_given(np.mean(clean, axis=0), table.atomic_number)
    b = a.copy()
    b[rows] = p_given(np.mean(swapped, axis=0)[rows], swaps.table.atomic_number[rows])
    out = []
    for quantile in (1.0, 0.999, 0.995, 0.99, 0.98, 0.95):
        cutoff = np.quantile(spread_clean, quantile)
        real = least(a, spread_clean <= cutoff)
        caught = least(b, spread_swapped <= cutoff)[swaps.structure]
        flagged = np.array([np.mean(real < t) for t in thresholds])
        detected = np.array([np.mean(caught < t) for t in thresholds])
        out.append({"models": f"masked mean, sites beyond the {quantile:.1%} quantile of "
                    "disagreement outside the domain", "combined by": "mean",
                    "site score": "p(given)",
                    "detection at 5 % flagged":
                        f"{detected[np.flatnonzero(flagged <= 0.05).max()]:.1%}",
                    "flagged at 90 % detection":
                        f"{flagged[np.flatnonzero(detected >= 0.9).min()]:.1%}",
                    "structure AUC": f"{checking.roc_auc(-caught, -real):.3f}"})
    return out


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
