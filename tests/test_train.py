"""Training end to end on toy cached features: outputs, resume, selection, CLI errors, sharding."""

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryknn import checkpoints
from cryknn import config as config_lib
from cryknn import errors
from cryknn import features
from cryknn import input_pipeline
from cryknn import train
from tests.conftest import REPO, error_lines, run_module, subprocess_env
from tests import side_lane, toy_data

DATASET = "toy/synthetic"
ELEMENTS = (1, 6, 8, 7, 30)  # H C O N Zn
QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    toy_data.write_toy_cache(d, DATASET, 8, ELEMENTS)
    return d


def _config(data_dir, **kw):
    base = dict(dataset=DATASET, data_dir=data_dir, k=5, num_elements=4, epochs=2,
                batch_size=64, log_every=5, width=32, depth=1, monitor_per_element=40)
    base.update(kw)
    return config_lib.Config(**base)


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
    assert saved["dataset_fingerprint"] == features.TOY_FINGERPRINT
    cm = np.asarray(test["confusion_matrix"]["counts"])
    assert test["confusion_matrix"]["elements"] == saved["elements"]
    assert cm.shape == (4, 4) and cm.sum() == test["num_atoms"]
    assert np.trace(cm) == pytest.approx(test["accuracy"] * test["num_atoms"])
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
    # ... and reports the run's training time and rate, not this call's zero.
    assert again["timing"]["train_s"] == pytest.approx(saved["timing"]["train_s"], rel=0.05)
    assert again["timing"]["train_s"] > 0 and again["timing"]["train_atoms_per_s"] > 0

    # Different run-defining flags in the same workdir: refused with one line.
    with pytest.raises(errors.ConfigError, match="k=5"):
        train.train_and_evaluate(_config(data_dir, k=4), workdir)


def test_checkpoint_resume_continues_exactly(data_dir, tmp_path):
    """Train 2 epochs straight vs 1 epoch, checkpoint, restore into a fresh trainer, 1 more."""
    cfg = _config(data_dir, model="two_stage")
    data = input_pipeline.prepare(cfg, log=QUIET)
    straight = train.Trainer.create(cfg, data)
    straight.fit(log=QUIET)

    mngr = checkpoints.manager(str(tmp_path))
    half = train.Trainer.create(cfg, data)
    half.fit([train.checkpoint_hook(mngr)], until_epoch=1, log=QUIET)  # stopped after epoch 1
    mngr.wait_until_finished()
    assert mngr.latest_step() == half.steps_per_epoch

    resumed = train.Trainer.create(cfg, data)
    assert resumed.restore(checkpoints.manager(str(tmp_path)))
    assert int(resumed.state.step) == resumed.steps_per_epoch and len(resumed.history) == 1
    resumed.fit(log=QUIET)
    for a, b in zip(jax.tree_util.tree_leaves(straight.state.params),
                    jax.tree_util.tree_leaves(resumed.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_hooks_run_on_schedule_and_stop_the_clock(data_dir):
    cfg = _config(data_dir)
    trainer = train.Trainer.create(cfg, input_pipeline.prepare(cfg, log=QUIET))
    seen = []
    hooks = [train.Hook(lambda t: seen.append(("every", int(t.state.step))), every_steps=3),
             train.Hook(lambda t: seen.append(("epoch", len(t.history))), at_epoch_end=True)]
    trainer.fit(hooks, log=QUIET)
    spe = trainer.steps_per_epoch
    assert [s for kind, s in seen if kind == "every"] == list(range(3, 2 * spe + 1, 3))
    assert [n for kind, n in seen if kind == "epoch"] == [1, 2]  # after the history entry
    loss_atoms = sum(int(b["mask"].sum()) for e in range(2)
                     for b in trainer.batches.epoch(trainer.data.train, seed=cfg.seed, epoch=e))
    assert 0 < trainer.train_seconds and trainer.trained_atoms == loss_atoms


def test_one_training_step_lowers_the_loss(data_dir):
    cfg = _config(data_dir, learning_rate=1e-2, warmup_steps=1)
    data = input_pipeline.prepare(cfg, log=QUIET)
    trainer = train.Trainer.create(cfg, data)
    step = trainer.parallel.jit_step(train.train_step, num_replicated_args=2)
    batch = trainer.parallel.global_batch(
        next(trainer.batches.epoch(data.train, seed=0, epoch=0)))
    weights = jnp.asarray(data.class_weights)
    losses = []
    state = trainer.state
    for _ in range(5):
        state, m = step(state, batch, weights, np.int32(0))
        losses.append(float(m["loss_sum"] / m["count"]))
    assert int(state.step) == 5
    assert losses[-1] < losses[0]


def test_non_finite_loss_stops_training_and_keeps_finite_checkpoints(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(errors.TrainingDivergedError, match="diverged"):
        train.train_and_evaluate(_config(data_dir, learning_rate=1e12, epochs=3), workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    step = checkpoints.latest_step(workdir)
    if step is not None:  # whatever was saved is finite
        assert train.all_finite(checkpoints.load_trained(workdir).params)


def _run_main(*args, timeout=300):
    return run_module("cryknn.main", *args, timeout=timeout)


@pytest.mark.parametrize("args,expect", [
    (["--k=0"], "--k must be at least 1"),
    (["--k=five"], "k"),
    (["--num_elements=50"], "only 5 elements"),
])
def test_bad_flags_exit_with_one_line(data_dir, tmp_path, args, expect):
    r = _run_main(f"--data_dir={data_dir}", f"--dataset={DATASET}",
                  f"--workdir={tmp_path / 'w'}", *args)
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("kw,expect", [
    (dict(elements="C,Xy"), "Xy"),
    (dict(elements="C,Li"), "no training atoms of Li"),
    (dict(model="transformer"), "--model must be one of"),
    (dict(dropout=1.5), "--dropout"),
    (dict(class_weighting="magic"), "--class_weighting must be one of"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(batch_size=100000, model="mlp"), "larger than"),
])
def test_bad_values_raise_one_line_errors(data_dir, tmp_path, kw, expect):
    with pytest.raises(errors.UserError) as e:
        train.train_and_evaluate(_config(data_dir, **kw), str(tmp_path / "w"))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unwritable_workdir_exits_with_one_line(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run_main(f"--data_dir={data_dir}", f"--dataset={DATASET}", f"--workdir={blocker}/w")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "workdir" in r.stderr, r.stderr


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from cryknn import config, input_pipeline, models, parallel, train
    from tests import toy_data
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    weights = jnp.asarray([0.5, 1.0, 2.0, 1.5])
    results = {}

    def make_batch(cfg):
        spec = config.input_spec(cfg)
        if spec.reads == "graph":  # 8 packs of 32 slots: one per device, or all on one
            table = toy_data.toy_features((1, 6, 8, 29), 100, 5, atoms_per_structure=12,
                                          seed=1)
            atoms = input_pipeline.LabelledAtoms(
                table, np.arange(len(table)), rng.integers(0, 4, len(table)).astype(np.int32))
            return next(input_pipeline.batches_for(spec, 8 * 32, 8, 8).epoch(
                atoms, seed=0, epoch=0))
        inputs = {name: (rng.uniform(0.9, 3.0, x.shape).astype(np.float32)) for name, x in
                  input_pipeline.filler_inputs(spec, 64).items()}
        return {"inputs": inputs, "label": rng.integers(0, 4, 64).astype(np.int32),
                "mask": np.r_[np.ones(60), np.zeros(4)].astype(np.float32)}

    for model in ("mlp", "two_stage", "graph", "tree"):
        cfg = config.Config(k=5, model=model, width=16, depth=1, dropout=0.0, batch_size=64,
                            hops=2)
        batch = make_batch(cfg)
        for n in (8, 1):
            par = parallel.DataParallel.create(jax.devices()[:n])
            state = par.replicate(train.create_train_state(models.create_model(cfg, 4), cfg, 100))
            step = par.jit_step(train.train_step, num_replicated_args=2)
            gb = par.global_batch(batch)
            assert len(jax.tree.leaves(gb["inputs"])[0].sharding.device_set) == n
            if n == 8:  # each device gathers within its own packs: nothing is all-gathered
                hlo = step.lower(state, gb, par.replicate(weights), np.int32(0)).compile()
                assert "all-gather" not in hlo.as_text(), model
            losses = []
            for _ in range(2):
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


def _sharded_step_job(folder):
    return side_lane.Job([sys.executable, "-c", SHARDED],
                         subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), REPO)


@pytest.mark.slow
@pytest.mark.side_lane(job=_sharded_step_job)
def test_sharded_step_matches_single_device(side_job):
    r = side_job.result
    assert "SHARDED_OK" in r.stdout, r.stdout + r.stderr


def _two_process_job(folder):
    """Two local processes of one --multihost run (2 CPU devices each), side by side."""
    data_dir, workdir = str(folder / "data"), str(folder / "w")
    toy_data.write_toy_cache(data_dir, DATASET, 5, (1, 6, 8), (200, 40, 40),
                             process_count=2)
    return side_lane.commands_job(folder, [
        [sys.executable, "-m", "cryknn.main", "--multihost",
         "--coordinator_address=localhost:{free_port}", "--num_processes=2",
         f"--process_id={i}", f"--dataset={DATASET}", f"--data_dir={data_dir}",
         f"--workdir={workdir}", "--model=mlp", "--epochs=1", "--batch_size=256",
         "--num_elements=3", "--width=16", "--log_every=1000"] for i in range(2)],
        subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), REPO)


@pytest.mark.slow
@pytest.mark.side_lane(job=_two_process_job)
def test_two_processes_each_read_their_own_part(side_job):
    """--multihost with 2 local processes x 2 CPU devices: one run over 4 devices. The
    mlp: which part each process reads, and the run's devices, do not depend on the model
    (the sharded step of every model: test_sharded_step_matches_single_device)."""
    results = side_job.commands()
    assert [r.returncode for r in results] == [0, 0], [r.stdout + r.stderr for r in results]
    workdir = side_job.folder / "w"
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["timing"]["processes"] == 2 and metrics["timing"]["devices"] == 4
    assert metrics["test"]["num_atoms"] == 2 * 3 * 40  # both processes' test parts
    for i in range(2):
        assert (workdir / f"misclassifications.p{i}.csv").exists()
