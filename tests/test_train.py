"""Training end to end on toy cached features: outputs, resume, selection, CLI errors, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryknn import input_pipeline
from cryknn import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "toy/synthetic"
ELEMENTS = (1, 6, 8, 7, 30)  # H C O N Zn


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    input_pipeline.write_toy_cache(d, DATASET, 8, ELEMENTS)
    return d


def _config(data_dir, **kw):
    base = dict(dataset=DATASET, data_dir=data_dir, k=5, num_elements=4, epochs=2,
                batch_size=64, log_every=5, width=32, depth=1, monitor_per_element=40)
    base.update(kw)
    return train.Config(**base)


def test_feature_cache_serves_smaller_k(data_dir):
    f = input_pipeline.load_features(DATASET, "train", 3, data_dir=data_dir, log=lambda m: None)
    full = input_pipeline.FeatureSet.load(input_pipeline.cache_path(data_dir, DATASET, 8, "train"))
    assert f.k == 3
    np.testing.assert_array_equal(f.distances, full.distances[:, :3])
    assert input_pipeline.find_cache(data_dir, DATASET, 9, "train") is None


def test_featurize_examples_matches_brute_force():
    """Examples -> FeatureSet through the featuriser (simple cubic: 6 at a, 12 at a*sqrt2)."""
    ex = {"id": "cube:cube", "lattice": np.eye(3) * 2.0, "frac": np.zeros((1, 3)),
          "numbers": np.array([29], np.int32), "labels": np.array(["Cu1"])}
    fs = input_pipeline.featurize_examples([ex, dict(ex, id=b"cube2:cube2")], 7)
    assert len(fs) == 2 and list(fs.structure_id) == ["cube:cube", "cube2:cube2"]
    np.testing.assert_allclose(fs.distances[0], [2.0] * 6 + [2.0 * np.sqrt(2)], rtol=1e-5)
    assert fs.site_label[0] == b"Cu1"


def test_choose_and_select_elements():
    counts = np.zeros(119, np.int64)
    counts[[1, 6, 8, 30]] = [500, 900, 300, 20]
    assert input_pipeline.choose_elements(counts, num_elements=3) == [6, 1, 8]
    assert input_pipeline.choose_elements(counts, elements="Zn,C") == [30, 6]
    with pytest.raises(input_pipeline.SelectionError, match="only 4 elements"):
        input_pipeline.choose_elements(counts, num_elements=5)
    with pytest.raises(input_pipeline.SelectionError, match="no training atoms of Li"):
        input_pipeline.choose_elements(counts, elements="C,Li")
    with pytest.raises(input_pipeline.SelectionError, match="Qq"):
        input_pipeline.choose_elements(counts, elements="C,Qq")
    z = np.array([6] * 50 + [1] * 10 + [17] * 5)
    idx = input_pipeline.select_atoms(z, [6, 1], max_per_element=20, seed=0)
    assert np.sum(z[idx] == 6) == 20 and np.sum(z[idx] == 1) == 10 and not np.any(z[idx] == 17)


def test_metrics_from_confusion_and_majority_baseline():
    from cryknn import evaluate

    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = np.zeros((8, 3))
    pred = [0, 0, 0, 1, 1, 0, 2, 1]
    second = [1, 1, 1, 0, 2, 1, 1, 2]
    probs[np.arange(8), pred] = 0.6
    probs[np.arange(8), second] = 0.3
    probs[probs == 0] = 0.1
    cm, hits = evaluate.confusion_counts(y, probs, 3, top=2)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 1, 1]] and hits == 8
    m = evaluate.metrics_from_confusion(cm, hits, ["C", "H", "O"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert m["per_element"]["H"]["precision"] == pytest.approx(1 / 3)
    assert m["per_element"]["C"]["f1"] == pytest.approx(0.75)
    assert m["most_confused"][0]["count"] == 1 and len(m["most_confused"]) == 3
    base = evaluate.majority_baseline(np.array([10, 50, 5]), cm)
    assert base["accuracy"] == pytest.approx(2 / 8)  # always 'H'
    assert base["balanced_accuracy"] == pytest.approx(1 / 3)


def test_train_and_evaluate_writes_reports_and_resumes(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    metrics = train.train_and_evaluate(_config(data_dir), workdir)
    for name in ("config.json", "metrics.json", "confusion_matrix.png", "training_curves.png",
                 "misclassifications.csv"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    test = saved["test"]
    for key in ("accuracy", "balanced_accuracy", "top3_accuracy", "per_element", "most_confused"):
        assert key in test
    assert set(test["per_element"]) == {"C", "H", "O", "N"}  # Zn (5th) is excluded, not lumped
    assert test["num_atoms"] == 4 * 60
    assert saved["majority_baseline"]["accuracy"] <= test["accuracy"] + 1e-9
    assert saved["flags"]["k"] == 5 and "total_s" in saved["timing"]
    assert test["accuracy"] > 0.5  # toy distances are easy
    with open(os.path.join(workdir, "misclassifications.csv")) as f:
        header = f.readline().strip().split(",")
    assert header == ["structure_id", "site_label", "true_element", "predicted_element",
                      "probability"]
    assert metrics["test"]["accuracy"] == test["accuracy"]
    capsys.readouterr()

    # Same flags again: resumes from the final checkpoint, no training steps.
    again = train.train_and_evaluate(_config(data_dir), workdir)
    out = capsys.readouterr().out
    assert "resumed from" in out and "atoms/s" not in out
    assert again["test"]["accuracy"] == pytest.approx(test["accuracy"])

    # Different run-defining flags in the same workdir: refused with one line.
    with pytest.raises(train.ConfigError, match="k=5"):
        train.train_and_evaluate(_config(data_dir, k=4), workdir)


def test_checkpoint_resume_continues_exactly(data_dir, tmp_path):
    """Train 2 epochs straight vs 1 epoch, checkpoint, restore into a fresh run, 1 more."""
    cfg = _config(data_dir, model="seed")
    prepared = train.prepare_data(cfg, log=lambda m: None)
    straight = train.Run.create(cfg, prepared)
    straight.fit(log=lambda m: None)

    mngr = train.checkpoint_manager(str(tmp_path))
    half = train.Run.create(cfg, prepared)
    half.fit(mngr, log=lambda m: None, until_epoch=1)  # as if stopped after epoch 1
    assert mngr.latest_step() == half.steps_per_epoch

    resumed = train.Run.create(cfg, prepared)
    resumed.state, resumed.history = train.restore_checkpoint(
        train.checkpoint_manager(str(tmp_path)), resumed.state)
    assert int(resumed.state.step) == resumed.steps_per_epoch and len(resumed.history) == 1
    resumed.fit(log=lambda m: None)
    for a, b in zip(jax.tree_util.tree_leaves(straight.state.params),
                    jax.tree_util.tree_leaves(resumed.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_training_step_lowers_the_loss(data_dir):
    cfg = _config(data_dir, learning_rate=1e-2, warmup_steps=1)
    prepared = train.prepare_data(cfg, log=lambda m: None)
    run = train.Run.create(cfg, prepared)
    step = run.par.jit_train_step()
    batch = run.par.global_batch({"distances": prepared.train.x[:64],
                                  "label": prepared.train.y[:64],
                                  "mask": np.ones(64, np.float32)})
    weights = jnp.asarray(prepared.class_weights)
    losses = []
    state = run.state
    for _ in range(5):
        state, m = step(state, batch, weights, np.int32(0))
        losses.append(float(m["loss_sum"] / m["count"]))
    assert int(state.step) == 5
    assert losses[-1] < losses[0]


def _run_main(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cryknn.main", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("args,expect", [
    (["--k=0"], "--k must be at least 1"),
    (["--k=five"], "k"),
    (["--num_elements=50"], "only 5 elements"),
])
def test_bad_flags_exit_with_one_line(data_dir, tmp_path, args, expect):
    r = _run_main(f"--data_dir={data_dir}", f"--dataset={DATASET}",
                  f"--workdir={tmp_path / 'w'}", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expect in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("kw,expect", [
    (dict(elements="C,Xy"), "Xy"),
    (dict(elements="C,Li"), "no training atoms of Li"),
    (dict(model="transformer"), "--model must be one of"),
    (dict(class_weighting="magic"), "--class_weighting must be one of"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(batch_size=100000), "larger than"),
])
def test_bad_values_raise_one_line_errors(data_dir, tmp_path, kw, expect):
    with pytest.raises(train.user_errors()) as e:
        train.train_and_evaluate(_config(data_dir, **kw), str(tmp_path / "w"))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unwritable_workdir_exits_with_one_line(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run_main(f"--data_dir={data_dir}", f"--dataset={DATASET}", f"--workdir={blocker}/w")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "workdir" in r.stderr, r.stderr


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from cryknn import train
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batch = {"distances": rng.uniform(0.9, 3.0, (64, 5)).astype(np.float32),
             "label": rng.integers(0, 4, 64).astype(np.int32),
             "mask": np.r_[np.ones(60), np.zeros(4)].astype(np.float32)}
    weights = jnp.asarray([0.5, 1.0, 2.0, 1.5])
    results = {}
    for model in ("mlp", "seed"):
        cfg = train.Config(k=5, model=model, width=32, depth=2, dropout=0.0, batch_size=64)
        for n in (8, 1):
            par = train.Parallel.create(jax.devices()[:n])
            state = par.replicate(train.create_train_state(train.build_model(cfg, 4), cfg, 100))
            step = par.jit_train_step()
            gb = par.global_batch(batch)
            assert len(gb["distances"].sharding.device_set) == n
            losses = []
            for _ in range(3):
                state, m = step(state, gb, par.replicate(weights), np.int32(0))
                losses.append(float(m["loss_sum"] / m["count"]))
            results[(model, n)] = (losses, jax.tree_util.tree_leaves(state.params))
        (l8, p8), (l1, p1) = results[(model, 8)], results[(model, 1)]
        np.testing.assert_allclose(l8, l1, rtol=1e-5)
        for a, b in zip(p8, p1):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        print(model, "losses", l8, l1)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                       env=_env(), timeout=300, cwd=REPO)
    assert "SHARDED_OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_two_processes_each_read_their_own_part(tmp_path):
    """--multihost with 2 local processes x 2 CPU devices: one run over 4 devices."""
    import socket

    data_dir = str(tmp_path / "data")
    for pi in range(2):
        for i, (split, n) in enumerate(zip(("train", "validation", "test"), (200, 40, 40))):
            input_pipeline.toy_features((1, 6, 8), n, 5, seed=10 * pi + i).save(
                input_pipeline.cache_path(data_dir, DATASET, 5, split, pi, 2))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "w")
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cryknn.main", "--multihost",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
         f"--dataset={DATASET}", f"--data_dir={data_dir}", f"--workdir={workdir}",
         "--epochs=1", "--batch_size=64", "--num_elements=3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["timing"]["processes"] == 2 and metrics["timing"]["devices"] == 4
    assert metrics["test"]["num_atoms"] == 2 * 3 * 40  # both processes' test parts
    for i in range(2):
        assert os.path.exists(os.path.join(workdir, f"misclassifications.p{i}.csv"))
