"""Models, input maps, class weights and the weighted loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cryknn import config as config_lib
from cryknn import errors
from cryknn import models
from cryknn import train


def _model(name, num_classes, k, **kw):
    return models.create_model(config_lib.Config(model=name, k=k, **kw), num_classes)


def _inputs(x):
    return {"distances": jnp.asarray(x)}


def _two_stage_param_count(k, c):
    def dense(i, o):
        return i * o + o

    stage1 = dense(k, 64) + 2 * dense(64, 64) + dense(64, c)
    stage2 = dense(k + c, 128) + 2 * dense(128, 128) + dense(128, c)
    return stage1 + stage2


@pytest.mark.parametrize("k,c", [(1, 2), (5, 20)])
def test_two_stage_model_shapes_and_param_count(k, c):
    model = _model("two_stage", c, k)
    assert isinstance(model, models.TwoStageModel)
    params = models.init_params(model, k, jax.random.key(0))
    assert models.param_count(params) == _two_stage_param_count(k, c)
    out = model.apply({"params": params}, _inputs(jnp.ones((3, k))))
    assert out["logits"].shape == (3, c)
    assert out["stage1_logits"].shape == (3, c)


@pytest.mark.parametrize("input_map", models.INPUT_MAPS)
@pytest.mark.parametrize("k", [1, 5])
def test_mlp_shapes_and_param_count(k, input_map):
    c, width, depth = 6, 32, 2
    num_features = k if input_map == "raw" else (3 * k - 1 if k > 1 else 2)
    x = np.ones((4, k), np.float32)
    assert models.map_inputs(x, input_map).shape == (4, num_features)
    model = _model("mlp", c, k, width=width, depth=depth, input_map=input_map)
    params = models.init_params(model, k, jax.random.key(0))
    block = 2 * width + (width * 2 * width + 2 * width) + (2 * width * width + width)
    expected = (num_features * width + width) + depth * block + 2 * width + (width * c + c)
    assert models.param_count(params) == expected
    out = model.apply({"params": params}, _inputs(jnp.ones((3, k))))
    assert out["logits"].shape == (3, c)
    assert "stage1_logits" not in out


def test_input_map_values_and_overlapping_sites():
    d = np.array([[0.0, 1.0, 2.0]], np.float32)
    f = models.map_inputs(d, "inverse_log_diff")
    np.testing.assert_allclose(f[0, :3], [1 / models.MIN_DISTANCE, 1.0, 0.5])
    np.testing.assert_allclose(f[0, 3:6], np.log([models.MIN_DISTANCE, 1.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(f[0, 6:], [0.9, 1.0], rtol=1e-6)  # of clipped distances
    assert np.all(np.isfinite(models.map_inputs(jnp.asarray(d), "inverse_log_diff")))
    x = np.random.default_rng(0).uniform(1, 3, (50, 3))
    mean, std = models.input_statistics(x, "inverse_log_diff")
    assert len(mean) == len(std) == 8 and min(std) > 0
    mean, std = models.input_statistics(x, "raw")
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(std, x.std(0))
    # Per-process moments add up to the statistics of the whole set.
    halves = models.input_statistics(x[:20], "raw", sum_fn=lambda m: m + np.stack(
        [np.full(3, 30.0), x[20:].sum(0), (x[20:] ** 2).sum(0)]))
    np.testing.assert_allclose(halves[0], mean)
    np.testing.assert_allclose(halves[1], std)


def test_two_stage_stages_are_trained_by_their_own_losses():
    """The stop-gradient: stage 2's loss gives stage 1 no gradient (it was frozen)."""
    model = _model("two_stage", 4, 5)
    params = models.init_params(model, 5, jax.random.key(0))
    x = _inputs(jax.random.uniform(jax.random.key(1), (8, 5)) + 1)

    def stage2_loss(p):
        out = model.apply({"params": p}, x)
        labels = jnp.arange(8) % 4
        return optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()

    grads = jax.jit(jax.grad(stage2_loss))(params)  # one program, not op by op
    for name, g in grads.items():
        norm = sum(float(jnp.abs(v).sum()) for v in jax.tree_util.tree_leaves(g))
        assert (norm == 0) == name.startswith("stage1"), name


def test_weighted_loss_really_weights():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    labels = jnp.array([0, 1, 1, 0])
    mask = jnp.ones(4)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    uniform, _ = train.loss_fn({"logits": logits}, labels, mask, jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(uniform, ce.mean(), rtol=1e-6)
    only0, _ = train.loss_fn({"logits": logits}, labels, mask, jnp.array([2.0, 0.0]))
    np.testing.assert_allclose(only0, 2.0 * (ce[0] + ce[3]) / 4, rtol=1e-6)
    only1, _ = train.loss_fn({"logits": logits}, labels, mask, jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(only1, 2.0 * (ce[1] + ce[2]) / 4, rtol=1e-6)
    assert not np.isclose(only0, only1)
    # Padding (mask 0) contributes nothing.
    padded, m = train.loss_fn({"logits": logits}, labels, jnp.array([1.0, 1.0, 0.0, 0.0]),
                              jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(padded, (ce[0] + ce[1]) / 2, rtol=1e-6)
    assert float(m["count"]) == 2


def test_two_stage_loss_weights_both_stages():
    logits = jnp.zeros((2, 3))
    s1 = jnp.array([[3.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    out = {"logits": logits, "stage1_logits": s1}
    bce = optax.sigmoid_binary_cross_entropy(s1, jax.nn.one_hot(labels, 3)).mean(-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss, _ = train.loss_fn(out, labels, jnp.ones(2), jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(loss, (ce[0] + bce[0]) / 2, rtol=1e-6)


def test_unknown_model_name():
    with pytest.raises(errors.ConfigError, match="--model must be one of"):
        _model("transformer", 3, 5)
