"""Smoke tests of the research scripts' pure functions (experiments/*.py) on tiny inputs."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load("common")
distances = _load("distances")
k_sweep = _load("k_sweep")
warm_start_sweep = _load("warm_start_sweep")
confusions = _load("confusions")
ablation = _load("ablation")
headline = _load("headline")


# ----------------------------------------------------------------------------
# common


def test_covalent_radii_and_groups():
    assert common.covalent_sum("C", "C") == pytest.approx(1.52)
    assert common.covalent_sum("O", "H") == pytest.approx(0.97)
    assert common.covalent_sum("C", "Xx") is None
    np.testing.assert_array_equal(common.group_symbols(np.array(["C", "Zn", "H", "Cu", "Si"])),
                                  ["C", "M", "H", "M", "Si"])
    np.testing.assert_array_equal(common.symbols_of(np.array([[1, 6], [30, 8]])),
                                  [["H", "C"], ["Zn", "O"]])


def test_covalent_radii_match_ase_when_installed():
    ase_data = pytest.importorskip("ase.data")
    for sym, r in common.COVALENT_RADIUS.items():
        assert ase_data.covalent_radii[ase_data.atomic_numbers[sym]] == pytest.approx(r), sym


def test_best_k_one_sd():
    per_k = {1: [0.50, 0.52, 0.51], 2: [0.70, 0.71, 0.69], 3: [0.75, 0.76, 0.755],
             4: [0.755, 0.765, 0.745], 5: [0.75, 0.77, 0.76]}
    d = common.best_k_one_sd(per_k)
    # best mean is k=5 (0.76, std 0.01): threshold 0.75; k=3 (0.755) is the smallest above it
    assert d["best_k"] == 5 and d["chosen_k"] == 3
    assert d["threshold"] == pytest.approx(0.75)
    assert common.best_k_one_sd({7: [0.3]})["chosen_k"] == 7  # one seed: std 0
    with pytest.raises(ValueError):
        common.best_k_one_sd({})


def test_markdown_table():
    md = common.markdown_table([{"a": "x", "b": 0.12345, "c": 3, "d": None}], "abcd")
    assert md.splitlines()[2] == "| x | 0.123 | 3 | - |"


# ----------------------------------------------------------------------------
# distances


def _tiny():
    """Three atoms per 'structure' with known neighbours: C(0) H(1) Zn(2)."""
    s = SimpleNamespace(numbers=np.array([6, 1, 30], np.int32))
    n = SimpleNamespace(distances=np.array([[1.0, 2.0], [1.0, 1.5], [1.5, 2.0]], np.float32),
                        indices=np.array([[1, 2], [0, 2], [1, 0]], np.int32))
    return [s, s], [n, n]


def test_neighbour_arrays_and_pair_rows():
    centre, neigh, dist = distances.neighbour_arrays(*_tiny())
    np.testing.assert_array_equal(centre, [6, 1, 30, 6, 1, 30])
    np.testing.assert_array_equal(neigh[0], [1, 30])
    rows = distances.pair_rows(centre, neigh, dist, min_count=1)
    by_key = {(r["rank"], r["centre"], r["neighbour"], r["kind"]): r for r in rows}
    ch = by_key[(1, "C", "H", "element")]
    assert ch["count"] == 2 and ch["median"] == pytest.approx(1.0) and ch["fraction"] == 1.0
    assert ch["covalent_sum"] == pytest.approx(1.07)
    assert ch["median_minus_cov"] == pytest.approx(-0.07)
    assert by_key[(1, "M", "H", "group")]["count"] == 2  # Zn grouped as metal
    assert (1, "C", "H", "group") not in by_key  # no metal: only the element row
    assert by_key[(2, "H", "M", "group")]["median"] == pytest.approx(1.5)
    assert distances.pair_rows(centre, neigh, dist, min_count=3) == []


def test_pair_mask_summaries_and_histogram():
    c = np.array(["C", "Zn", "O", "Cu"])
    n = np.array(["O", "O", "Zn", "N"])
    np.testing.assert_array_equal(distances.pair_mask(c, n, ("M", "O")), [0, 1, 0, 0])
    np.testing.assert_array_equal(distances.pair_mask(c, n, ("*", "*")), [1, 1, 1, 1])
    np.testing.assert_array_equal(distances.pair_mask(c, n, ("O", "M")), [0, 0, 1, 0])
    assert distances.mode_of(np.array([1.001, 1.002, 1.004, 2.0])) == pytest.approx(1.005)
    s = distances.summarize(np.array([]))
    assert s["count"] == 0 and math.isnan(s["median"])
    counts, edges = distances.histogram(np.array([0.01, 0.03, 4.99, 7.0]))
    assert counts.sum() == 3 and edges[0] == 0 and edges[-1] == pytest.approx(5.0)
    assert distances.top_metals(c, n, ("M", "O")) == ["Zn"]


def test_plots_write_pngs(tmp_path):
    centre, neigh, dist = distances.neighbour_arrays(*_tiny())
    c_sym, n_sym = common.symbols_of(centre), common.symbols_of(neigh)
    distances.plot_rank(c_sym, n_sym[:, 0], dist[:, 0], 1, "tiny", tmp_path / "r1.png")
    distances.plot_pooled(c_sym, dist, "tiny", tmp_path / "pooled.png")
    distances.plot_compare({"a": (c_sym, n_sym, dist), "b": (c_sym, n_sym, dist)},
                           tmp_path / "cmp.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("r1.png", "pooled.png", "cmp.png"))


def test_rock_salt_first_neighbours_through_the_featuriser():
    """NaCl (a = 5.64 A): 6 Cl at a/2 around every Na (and vice versa), then 12 like ions."""
    from cryknn import neighbours

    a = 5.64
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]])
    s = SimpleNamespace(lattice=np.eye(3) * a, frac=frac,
                        numbers=np.array([11] * 4 + [17] * 4, np.int32))
    neigh = neighbours.featurize([s], 7)
    centre, nz, dist = distances.neighbour_arrays([s], neigh)
    rows = distances.pair_rows(centre, nz, dist)
    first = {(r["centre"], r["neighbour"]): r for r in rows if r["rank"] == 1
             and r["kind"] == "element"}
    assert set(first) == {("Na", "Cl"), ("Cl", "Na")}
    assert first[("Na", "Cl")]["median"] == pytest.approx(a / 2, abs=1e-4)
    seventh = [r for r in rows if r["rank"] == 7 and r["kind"] == "element"]
    assert {(r["centre"], r["neighbour"]) for r in seventh} == {("Na", "Na"), ("Cl", "Cl")}


# ----------------------------------------------------------------------------
# k sweep, warm start, confusions


def _metrics(bal, val_bal, params=1000, train_s=10.0):
    m = {"accuracy": bal + 0.1, "balanced_accuracy": bal, "top3_accuracy": bal + 0.2}
    return {"test": m, "validation": dict(m, balanced_accuracy=val_bal), "num_params": params,
            "timing": {"train_s": train_s, "total_s": train_s + 5},
            "history": [{"step": 100}], "majority_baseline": {"accuracy": 0.3,
                                                             "balanced_accuracy": 0.05},
            "elements": ["C", "H"]}


def test_sweep_aggregate_and_choice(tmp_path):
    vals = {1: (0.4, 0.41, 0.42), 2: (0.61, 0.62, 0.615), 3: (0.63, 0.62, 0.61)}
    records = [k_sweep.run_record(k, s, _metrics(v, v, params=100 * k))
               for k, vs in vals.items() for s, v in enumerate(vs)]
    rows = k_sweep.aggregate(records)
    assert [r["k"] for r in rows] == [1, 2, 3]
    assert rows[1]["test_balanced_accuracy_mean"] == pytest.approx(0.615)
    assert rows[1]["test_balanced_accuracy_std"] == pytest.approx(0.005)
    decision = k_sweep.choose_k(records)
    assert decision["best_k"] == 3 and decision["chosen_k"] == 2
    k_sweep.plot(rows, records, decision, "tiny", tmp_path / "sweep.png")
    assert "| 2 | 3 |" in k_sweep.table_markdown(rows)


def test_sweep_per_seed_table_has_intervals_and_weak_element_recall():
    records = []
    for seed, (bal, fe) in enumerate([(0.80, 0.4), (0.82, 0.6)]):
        m = _metrics(bal, bal - 0.01)
        m["test"]["intervals"] = {"balanced_accuracy": [bal - 0.03, bal + 0.03]}
        m["test"]["per_element"] = {"Fe": {"recall": fe}, "Cl": {"recall": 0.9}}
        records.append(k_sweep.run_record(5, seed, m))
    records.append(k_sweep.run_record(6, 0, _metrics(0.85, 0.84)))  # an older metrics.json
    table = k_sweep.per_seed_markdown(records).splitlines()
    assert table[2] == ("| 5 | 2 | 0.790 / 0.810 | 0.800 / 0.820 | [0.770, 0.830] "
                        "[0.790, 0.850] | 0.50 / - / - / 0.90 |")
    assert table[3] == "| 6 | 1 | 0.840 | 0.850 | - | - / - / - / - |"


def test_warm_start_first_reach_and_compare(tmp_path):
    warm = [{"step": 0, "seconds": 0.0, "balanced_accuracy": 0.70},
            {"step": 25, "seconds": 1.0, "balanced_accuracy": 0.74},
            {"step": 50, "seconds": 2.0, "balanced_accuracy": 0.76}]
    scratch = [{"step": 0, "seconds": 0.0, "balanced_accuracy": 0.05},
               {"step": 25, "seconds": 1.0, "balanced_accuracy": 0.60},
               {"step": 50, "seconds": 2.0, "balanced_accuracy": 0.745}]
    assert warm_start_sweep.first_reach(warm, 0.72)["step"] == 25
    assert warm_start_sweep.first_reach(warm, 0.9) is None
    c = warm_start_sweep.compare(warm, scratch)
    assert c["target_balanced_accuracy"] == 0.745
    assert (c["warm_steps"], c["scratch_steps"], c["step_ratio"]) == (50, 50, 1.0)
    c = warm_start_sweep.compare(warm[:2] + [dict(warm[2], balanced_accuracy=0.8)], scratch)
    assert c["warm_steps"] == 50
    c = warm_start_sweep.compare([dict(p, balanced_accuracy=0.9) for p in warm], scratch)
    assert c["warm_steps"] == 0 and "step_ratio" not in c
    test = {"accuracy": 0.9, "balanced_accuracy": 0.8, "top3_accuracy": 0.95}
    results = [{"k": 5, "k_new": 6, "seed": s, "warm_lr_scale": lr, "warm_curve": warm,
                "scratch_curve": scratch, "base_test": test, "warm_test": test,
                "scratch_test": test, "base_validation_balanced_accuracy": 0.7,
                "comparison": warm_start_sweep.compare(warm if lr == 1 else warm[:2], scratch)}
               for s in (0, 1) for lr in (1.0, 0.1)]
    rows = warm_start_sweep.summary(results)
    assert [(r["lr"], r["reached"], r["warm_steps"]) for r in rows] == [("x1", "2/2", 50),
                                                                      ("x0.1", "0/2", None)]
    assert "| 5 -> 6 | x0.1 | 2 | 0/2 | - |" in warm_start_sweep.summary_markdown(rows)
    assert "| 5 -> 6 | 1 | x0.1 |" in warm_start_sweep.table_markdown(results)
    warm_start_sweep.plot(results, "tiny", tmp_path / "warm.png")
    assert (tmp_path / "warm.png").stat().st_size > 1000


def _write_run(d, symbols, cm, wrong):
    d.mkdir(parents=True)
    stored = {"elements": symbols, "counts": cm}
    (d / "metrics.json").write_text(json.dumps({"elements": symbols,
                                                "test": {"confusion_matrix": stored}}))
    with open(d / "misclassifications.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["structure_id", "site_label", "true_element", "predicted_element",
                    "probability"])
        w.writerows(wrong)


def test_confusions_from_workdirs(tmp_path):
    symbols = ["C", "H", "O"]
    wrong = [["a:a", "C1", "C", "O", "0.9"], ["b:b", "C2", "C", "O", "0.6"],
             ["a:a", "C3", "C", "O", "0.8"], ["c:c", "O1", "O", "C", "0.5"]]
    cms = {1: [[7, 0, 3], [0, 5, 0], [1, 0, 3]], 2: [[8, 0, 2], [0, 5, 0], [1, 0, 3]]}
    for k in (1, 2):
        for seed in (0, 1):
            _write_run(tmp_path / f"k{k}_s{seed}", symbols, cms[k], wrong[: 4 - k + 1])
    data = confusions.collect(tmp_path)
    assert sorted(data) == [1, 2] and data[1]["seeds"] == 2
    cm = data[1]["cm"]
    np.testing.assert_array_equal(cm, [[14, 0, 6], [0, 10, 0], [2, 0, 6]])  # 2 seeds summed
    np.testing.assert_allclose(confusions.row_normalise(cm).sum(axis=1), 1.0)
    pairs = confusions.top_pairs(cm, symbols, 5)
    assert pairs[0] == {"true": "C", "predicted": "O", "count": 6, "fraction_of_true": 0.3}
    ex = confusions.examples(data[1]["rows"], "C", "O", 3)
    assert [e["site_label"] for e in ex] == ["C1", "C2"]  # most confident, one per structure
    md = confusions.report(data, 3, 2)
    assert "#### k = 2" in md and "`a:a` C1 (0.90)" in md and "| C | O | 3 | 0.300 |" in md
    confusions.plot(data, "tiny", tmp_path / "conf.png")
    assert (tmp_path / "conf.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="element order"):
        confusions.stored_confusion({"test": {"confusion_matrix": {
            "elements": ["H", "C", "O"], "counts": cms[1]}}}, symbols)


def test_ablation_summary_and_choice():
    def run(variant, seed, val, test):
        return {"variant": variant, "seed": seed, "validation_balanced_accuracy": val,
                "test_balanced_accuracy": test, "test_accuracy": test + 0.1, "train_s": 10.0,
                "num_params": 5}

    rows = [run("mlp_k5", s, 0.70 + s / 100, 0.9) for s in range(3)]
    rows += [run("graph_h2", s, 0.80, 0.5) for s in range(3)]
    summary = ablation.summarise(rows)
    assert [r["variant"] for r in summary] == ["mlp_k5", "graph_h2"]  # VARIANTS order
    assert summary[0]["validation_balanced_accuracy_mean"] == pytest.approx(0.71)
    # chosen on validation, never on test
    assert ablation.best_variant(summary)["variant"] == "graph_h2"
    assert ablation.best_variant(summary, "mlp")["variant"] == "mlp_k5"
    assert "| graph_h2 | 3 | 0.800 |" in ablation.table_markdown(summary)


def test_headline_aggregates_seeds(tmp_path):
    for seed, bal in enumerate((0.8, 0.9)):
        m = _metrics(bal, bal)
        m["flags"] = {"epochs": 3}
        m["elements"] = ["C", "H"]
        m["test"]["per_element"] = {"C": {"recall": bal, "support": 4},
                                    "H": {"recall": 1.0, "support": 2}}
        (tmp_path / f"graph_s{seed}").mkdir()
        (tmp_path / f"graph_s{seed}" / "metrics.json").write_text(json.dumps(m))
    runs = headline.runs_of(tmp_path, "graph")
    row = headline.model_row("graph", runs)
    assert row["seeds"] == 2 and row["balanced_accuracy"] == pytest.approx(0.85)
    assert row["balanced_accuracy_runs"] == "0.800 / 0.900"
    assert headline.per_element(runs)[0] == {"element": "C", "recall": pytest.approx(0.85),
                                             "support": 4}


def test_profile_groups_ops_by_module_and_pass():
    """experiments/profile_model.py: XLA ops attributed to the model module and pass they
    come from, times summed per step; trace events that are not ops are left out."""
    hlo = "\n".join([
        '  %fusion.1 = f32[4]{0} fusion(%p), metadata={op_name="jit(train_step)/'
        'jvp(GraphModel)/layer0/norm/mul" stack_frame_id=1}',
        '  ROOT %fusion.2 = f32[4]{0} fusion(%q), metadata={op_name="jit(train_step)/'
        'transpose(jvp(GraphModel))/layer0/norm/reduce_sum"}',
        '  %dot.3 = f32[4]{0} dot(%a, %b), metadata={op_name="jit(train_step)/'
        'jvp(GraphModel)/layer1/vmap()/gather"}',
        '  %copy.4 = f32[4]{0} copy(%a)'])
    sources = common.op_sources(hlo)
    assert sources == {"fusion.1": "forward GraphModel/layer0/norm",
                       "fusion.2": "backward GraphModel/layer0/norm",
                       "dot.3": "forward GraphModel/layer1/gather"}
    events = [{"ph": "X", "name": "fusion.1", "dur": 3000},
              {"ph": "X", "name": "fusion.1", "dur": 1000},
              {"ph": "X", "name": "dot.3", "dur": 500},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 90000},
              {"ph": "i", "name": "fusion.2", "dur": 7000}]
    assert common.group_times(events, sources, steps=2) == {
        "forward GraphModel/layer0/norm": 2.0, "forward GraphModel/layer1/gather": 0.25}


def test_checker_scores_groups_name_subsets_of_the_runs():
    checker_scores = _load("checker_scores")
    assert checker_scores.parse_groups(["tree:0+1+2", "graph:3+4+5"], 6) == {
        "tree": [0, 1, 2], "graph": [3, 4, 5]}
    for bad in ("tree", "tree:", "tree:0+x", ":0+1", "tree:0+6"):
        with pytest.raises(ValueError, match="--groups"):
            checker_scores.parse_groups([bad], 6)


def test_checker_scores_out_of_fold_measures_the_rule_on_groups_it_was_not_fitted_on():
    """Where real and swapped structures separate, every held-out half is clean and
    caught. Where some near-copy groups look swapped, a rule fitted to flag at most 5 %
    of one half flags more than that on some held-out halves, which the fit on the whole
    run never shows."""
    from cryknn import checking

    checker_scores = _load("checker_scores")
    rng = np.random.default_rng(0)
    structures = 400
    groups = np.asarray([f"g{i // 4}" for i in range(structures)])
    ones = np.ones(structures)

    def run_of(site_ratio):
        return checking.CheckRun(ones, np.full(structures, 6), ones, np.full(structures, 7),
                                 ones > 0, ones > 0, np.arange(structures),
                                 np.arange(structures), np.arange(structures), site_ratio,
                                 rng.uniform(0.0, 0.05, structures))

    clean = checker_scores.out_of_fold(run_of(rng.uniform(0.2, 1, structures)), groups, 5)
    assert float(clean["held-out flagged"].rstrip("%")) < 1  # at most the edge of a tie
    assert clean["held-out caught"] == "100.00%" and clean["halves flagging over 5 %"] == "0%"
    hard = np.isin(groups, [f"g{i}" for i in range(0, 100, 10)])  # 10 of 100 groups
    run = run_of(np.where(hard, rng.uniform(0.0, 0.05, structures),
                          rng.uniform(0.2, 1, structures)))
    in_sample = run.rates(checking.choose_rule(run, detection_target=0.9))
    assert in_sample["real_structures_flagged"] <= 0.05
    found = checker_scores.out_of_fold(run, groups, 10)
    assert found["halves flagging over 5 %"] != "0%"


def test_paired_models_rows_compare_two_runs_on_the_same_atoms():
    paired_models = _load("paired_models")
    labels = np.array([0, 0, 1, 1, 1, 0], np.int16)
    base = {"group": np.array(list("aabbcc")), "structure_id": np.array(list("ppqqrr")),
            "label": labels, "elements": np.array(["C", "N"])}
    a = {**base, "predicted": labels.copy()}
    b = {**base, "predicted": np.array([0, 1, 1, 1, 0, 0], np.int16)}
    rows = paired_models.paired_rows("A", "B", a, b)
    assert [r["metric"] for r in rows] == ["accuracy", "balanced_accuracy"]
    assert rows[0]["a_value"] == 1.0 and rows[0]["difference"] == pytest.approx(-2 / 6)
    with pytest.raises(ValueError, match="same atoms"):
        paired_models.paired_rows("A", "B", a, {**b, "label": labels[::-1].copy()})


def test_core_mof_unseen_keeps_the_files_of_unknown_families(tmp_path):
    """A CoRE MOF 2014 file is fresh when no structure of the build shares its family
    (refcode): suffixes such as 01 or _clean do not make a new family."""
    module = _load("core_mof_unseen")
    splits = tmp_path / "splits.csv"
    with open(splits, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["structure_id", "family", "group", "split"])
        writer.writerow(["ABAVIJ_clean:image0", "ABAVIJ", "ABAVIJ", "train"])
        writer.writerow(["1499489-acs_clean:image0", "1499489", "1499489", "test"])
    known = module.families_in(splits)
    members = [("x/ABAVIJ01_clean.cif", b"a"), ("x/ABAVOP_clean.cif", b"b"),
               ("x/ABAVIJ_charged.cif", b"c"), ("x/ZZZZZZ.cif", b"d")]
    seen = [0]
    kept = list(module.absent(members, known, seen))
    assert [name for name, _ in kept] == ["x/ABAVOP_clean.cif", "x/ZZZZZZ.cif"]
    assert seen == [4]
