"""Warm start from a k-model to a (k + m)-model: identical outputs at step 0, new rows learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryknn import checkpoints
from cryknn import config as config_lib
from cryknn import errors
from cryknn import input_pipeline
from cryknn import models
from cryknn import train
from cryknn import warm_start
from tests import toy_data

QUIET = lambda message: None  # noqa: E731


def _distances(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0.8, 4.0, (n, k)), axis=1).astype(np.float32)


def _mlp(k, stats_seed, width=16, depth=1, input_map="inverse_log_diff", classes=4):
    stats = models.input_statistics(_distances(200, k, stats_seed), input_map)
    config = config_lib.Config(model="mlp", k=k, width=width, depth=depth, input_map=input_map)
    return models.create_model(config, classes, stats)


def _two_stage(k, classes):
    return models.create_model(config_lib.Config(model="two_stage", k=k), classes)


def _apply(model, params, d):
    return model.apply({"params": params}, {"distances": jnp.asarray(d)})


def _perturbed(params, seed):
    """Random non-trivial parameters (LayerNorm scales and biases away from 1 and 0 too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(x.dtype), params)


def test_feature_positions():
    np.testing.assert_array_equal(warm_start.feature_positions("inverse_log_diff", 2, 4),
                                  [0, 1, 4, 5, 8])
    np.testing.assert_array_equal(warm_start.feature_positions("inverse_log_diff", 1, 3), [0, 3])
    np.testing.assert_array_equal(warm_start.feature_positions("raw", 3, 5), [0, 1, 2])
    d = _distances(5, 6)
    old = models.map_inputs(d[:, :4], "inverse_log_diff")
    new = models.map_inputs(d, "inverse_log_diff")
    np.testing.assert_array_equal(new[:, warm_start.feature_positions("inverse_log_diff", 4, 6)],
                                  old)
    with pytest.raises(errors.WarmStartError):
        warm_start.feature_positions("raw", 5, 3)


@pytest.mark.parametrize("input_map", ["inverse_log_diff", "raw"])
@pytest.mark.parametrize("k_old,k_new", [(1, 2), (3, 5), (5, 6), (4, 4)])
def test_mlp_outputs_identical_at_step_0(input_map, k_old, k_new):
    # Different data for the two models' feature statistics: the rescaling is exercised.
    old_model, new_model = _mlp(k_old, 1, input_map=input_map), _mlp(k_new, 2, input_map=input_map)
    old_params = _perturbed(models.init_params(old_model, k_old, jax.random.key(0)), 1)
    template = models.init_params(new_model, k_new, jax.random.key(5))
    params = warm_start.warm_start_params(old_model, old_params, new_model, template)
    d = _distances(64, k_new, 3)
    before = _apply(old_model, old_params, d[:, :k_old])["logits"]
    after = _apply(new_model, params, d)["logits"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(params) == jax.tree.structure(template)
    # The rows of the new features start at zero; everything past the input layer is copied.
    pos = warm_start.feature_positions(input_map, k_old, k_new)
    new_rows = np.setdiff1d(np.arange(params["embed"]["kernel"].shape[0]), pos)
    assert np.all(params["embed"]["kernel"][new_rows] == 0)
    np.testing.assert_array_equal(params["head"]["kernel"], old_params["head"]["kernel"])


@pytest.mark.parametrize("input_map", ["inverse_log_diff", "raw"])
def test_mlp_same_statistics_is_a_plain_copy(input_map):
    """Same training atoms give the shared features the same statistics: rows are copied."""
    d = _distances(300, 6, 7)

    def model(k):
        config = config_lib.Config(model="mlp", k=k, width=8, depth=1, input_map=input_map)
        return models.create_model(config, 3, models.input_statistics(d[:, :k], input_map))

    old_model, new_model = model(4), model(6)
    old_params = models.init_params(old_model, 4, jax.random.key(0))
    params = warm_start.warm_start_params(old_model, old_params, new_model,
                                          models.init_params(new_model, 6, jax.random.key(1)))
    pos = warm_start.feature_positions(input_map, 4, 6)
    np.testing.assert_allclose(params["embed"]["kernel"][pos], old_params["embed"]["kernel"],
                               rtol=1e-6)
    np.testing.assert_allclose(params["embed"]["bias"], old_params["embed"]["bias"], atol=1e-6)


@pytest.mark.parametrize("k_old,k_new", [(1, 3), (5, 10)])
def test_two_stage_outputs_identical_at_step_0(k_old, k_new):
    old_model = _two_stage(k_old, 5)
    new_model = _two_stage(k_new, 5)
    old_params = _perturbed(models.init_params(old_model, k_old, jax.random.key(0)), 2)
    params = warm_start.warm_start_params(
        old_model, old_params, new_model, models.init_params(new_model, k_new, jax.random.key(1)))
    d = _distances(32, k_new, 4)
    before = _apply(old_model, old_params, d[:, :k_old])
    after = _apply(new_model, params, d)
    for key in ("logits", "stage1_logits"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-5)
    assert np.all(params["stage1_dense0"]["kernel"][k_old:] == 0)
    assert np.all(params["stage2_dense0"]["kernel"][k_old:k_new] == 0)


def test_new_rows_get_gradient():
    """Zero rows are not stuck: the loss gradient reaches the new distances' weights."""
    old_model, new_model = _mlp(2, 1), _mlp(4, 1)
    old_params = _perturbed(models.init_params(old_model, 2, jax.random.key(0)), 1)
    params = warm_start.warm_start_params(old_model, old_params, new_model,
                                          models.init_params(new_model, 4, jax.random.key(1)))
    d = jnp.asarray(_distances(32, 4, 2))
    labels = jnp.arange(32) % 4

    def loss(p):
        out = _apply(new_model, p, d)
        return train.loss_fn(out, labels, jnp.ones(32), jnp.ones(4))[0]

    grads = jax.jit(jax.grad(loss))(params)  # one program, not op by op
    new_rows = np.setdiff1d(np.arange(11), warm_start.feature_positions("inverse_log_diff", 2, 4))
    assert np.abs(np.asarray(grads["embed"]["kernel"])[new_rows]).sum() > 0


def test_mismatches_raise():
    old_model = _mlp(3, 1, width=16)
    old_params = models.init_params(old_model, 3, jax.random.key(0))
    for other in (_mlp(5, 1, width=32), _mlp(5, 1, classes=6), _mlp(5, 1, input_map="raw"),
                  _two_stage(5, 4)):
        with pytest.raises(errors.WarmStartError):
            warm_start.warm_start_params(old_model, old_params, other,
                                         models.init_params(other, 5, jax.random.key(0)))
    smaller = _mlp(2, 1, width=16)
    with pytest.raises(errors.WarmStartError, match="fewer"):
        warm_start.warm_start_params(old_model, old_params, smaller,
                                     models.init_params(smaller, 2, jax.random.key(0)))


@pytest.mark.slow
def test_warm_start_trainer_from_a_trained_workdir(tmp_path):
    """Train k=2 on toy data, warm start a k=4 train.Trainer: same validation probabilities."""
    data_dir, dataset = str(tmp_path / "data"), "toy/synthetic"
    toy_data.write_toy_cache(data_dir, dataset, 4, (1, 6, 8, 30))
    base = dict(dataset=dataset, data_dir=data_dir, model="mlp", num_elements=4, epochs=1,
                batch_size=64, log_every=1000, width=16, depth=1, monitor_per_element=40)
    old_dir = str(tmp_path / "k2")
    train.train_and_evaluate(config_lib.Config(k=2, **base), old_dir)
    trained = checkpoints.load_trained(old_dir)

    config = config_lib.Config(k=4, **base)
    trainer = train.Trainer.create(config, input_pipeline.prepare(config, log=QUIET))
    warm_start.warm_start_trainer(trainer, trained)
    monitor = trainer.data.monitor
    new = trainer.probs(monitor)
    old = jax.nn.softmax(_apply(trained.model, trained.params, monitor.distances[:, :2])["logits"],
                         -1)
    np.testing.assert_allclose(new, old, atol=1e-5)
    trainer.fit(log=QUIET)  # and it trains on from there
    assert trainer.history and np.isfinite(trainer.history[-1]["train_loss"])

    other = config_lib.Config(k=4, **dict(base, num_elements=3))
    trainer3 = train.Trainer.create(other, input_pipeline.prepare(other, log=QUIET))
    with pytest.raises(errors.WarmStartError, match="classifies"):
        warm_start.warm_start_trainer(trainer3, trained)


def test_graph_warm_start_copies_everything_but_the_new_input_rows():
    """The graph model warm-starts (not exactly: a k'-node averages k' neighbours' messages)."""
    for name, layer in (("graph", "layer1"), ("tree", "round1")):
        def graph(k, seed):
            config = config_lib.Config(model=name, k=k, hops=2, width=8, directions=True)
            model = models.create_model(config, 3,
                                        models.input_statistics(_distances(100, k, seed)))
            inputs = input_pipeline.example_inputs(config_lib.input_spec(config))
            return model, models.init_params(model, k, jax.random.key(seed), inputs)

        (old_model, old_params), (new_model, template) = graph(3, 0), graph(5, 1)
        old_params = _perturbed(old_params, 2)
        params = warm_start.warm_start_params(old_model, old_params, new_model, template)
        assert params["encode_in"]["kernel"].shape == (5, 8)
        assert np.all(params["encode_in"]["kernel"][3:] == 0)
        np.testing.assert_array_equal(params[layer]["message"]["kernel"],
                                      old_params[layer]["message"]["kernel"])
