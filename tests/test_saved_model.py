"""Saved models (cryknn.saved_model): model.json + params.msgpack round trip bit for bit,
non-finite parameters are never written, and input sizes are bounded per model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cryknn import config as config_lib
from cryknn import errors
from cryknn import saved_model
from cryknn import scoring


def test_a_saved_model_round_trips(tmp_path):
    shipped = saved_model.load(f"{scoring.PRETRAINED}/{scoring.DEFAULT_MODEL}")
    saved_model.save(str(tmp_path), shipped.run, shipped.params, step=shipped.step)
    again = saved_model.load(str(tmp_path))
    assert again.config == shipped.config and again.symbols == shipped.symbols
    for a, b in zip(jax.tree_util.tree_leaves(again.params),
                    jax.tree_util.tree_leaves(shipped.params)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_parameters_are_never_saved(tmp_path):
    shipped = saved_model.load(f"{scoring.PRETRAINED}/{scoring.DEFAULT_MODEL}")
    broken = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), shipped.params)
    with pytest.raises(errors.UserError):
        saved_model.save(str(tmp_path / "m"), shipped.run, broken)
    assert not saved_model.exists(str(tmp_path / "m"))


def test_input_floats_count_the_tree_and_not_the_graph():
    tree = config_lib.Config(model="tree", k=5, hops=2)
    assert saved_model.input_floats(tree) == 5 * (1 + 5 + 25)
    assert saved_model.input_floats(config_lib.Config(model="mlp", k=5)) == 5
    assert saved_model.input_floats(config_lib.Config(model="graph", k=5, hops=2)) == 5


def test_parameter_shapes_are_kept_beside_the_xla_cache(tmp_path, monkeypatch):
    """With an on-disk XLA cache, a load traces each architecture's parameter shapes once
    and keeps them there: the next process reads them and traces nothing, parameters
    that do not fit are still refused, and a kept file that does not read is traced
    again."""
    import shutil

    from flax import serialization

    source = f"{scoring.PRETRAINED}/{scoring.DEFAULT_MODEL}"
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    monkeypatch.setattr(saved_model, "_SHAPES", {})
    try:
        saved_model.load(source)
        (kept,) = (tmp_path / "xla" / saved_model.SHAPES_FOLDER).glob("*.json")
        monkeypatch.setattr(saved_model, "_SHAPES", {})  # a new process
        with monkeypatch.context() as patch:
            patch.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("traced again"))
            saved_model.load(source)
            damaged = tmp_path / "damaged"
            shutil.copytree(source, damaged)
            params = saved_model.load(source).params
            first = jax.tree_util.tree_leaves(params)[0]
            cut = jax.tree_util.tree_map(lambda x: x[:1] if x is first else x, params)
            (damaged / saved_model.PARAMS).write_bytes(serialization.msgpack_serialize(
                jax.tree_util.tree_map(np.asarray, cut)))
            with pytest.raises(errors.ModelError, match="does not describe the parameters"):
                saved_model.load(str(damaged))
        kept.write_text("not json")
        monkeypatch.setattr(saved_model, "_SHAPES", {})
        saved_model.load(source)
        assert saved_model._read_shapes(str(kept)) is not None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
