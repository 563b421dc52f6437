"""Run configuration (cryknn.config): every value that cannot work is one ConfigError line
before any data is read; saved configurations of older versions still load."""

from __future__ import annotations

import pytest

from cryknn import config as config_lib
from cryknn import errors


@pytest.mark.parametrize("kw,expect", [
    ({"class_weighting": "bogus"}, "--class_weighting"),
    ({"elements": "C,Qq"}, "Qq"),
    ({"elements": "C"}, "at least 2 elements"),
    ({"num_elements": 1}, "--num_elements"),
    ({"model": "seed"}, "--model=two_stage"),
    ({"model": "transformer"}, "--model must be one of"),
    ({"k": 0}, "--k"),
    ({"max_per_element": -1}, "--max_per_element"),
    ({"learning_rate": 0.0}, "--learning_rate"),
    ({"model": "mlp", "neighbour_elements": True}, "--neighbour_elements"),
    ({"model": "graph", "hops": 5}, "--hops"),
])
def test_values_that_cannot_work_are_one_line_errors(kw, expect):
    with pytest.raises(errors.ConfigError, match=expect) as e:
        config_lib.validate(config_lib.Config(**kw))
    assert "\n" not in str(e.value)


def test_model_defaults_fill_the_fields_left_unset():
    graph = config_lib.Config(model="graph")
    assert graph.width == config_lib.MODEL_DEFAULTS["graph"]["width"]
    assert config_lib.Config(model="graph", width=8).width == 8
    config_lib.validate(graph)


def test_saved_configurations_of_older_versions_load():
    assert config_lib.from_dict({"model": "seed", "k": 5}).model == "two_stage"
    assert config_lib.from_dict({"model": "graph", "k": 5}).model == "tree"  # before 0.3
    assert config_lib.from_dict({"model": "graph", "directions": False}).model == "graph"
    # Graph runs saved before --angular_channels existed read 16 channels.
    assert config_lib.from_dict({"model": "graph", "directions": True}).angular_channels == 16
    assert config_lib.from_dict({"model": "graph", "directions": True, "angular_channels": 4}
                                ).angular_channels == 4
    assert config_lib.from_dict({"features": "inverse_log_diff", "model": "mlp"}
                                ).input_map == "inverse_log_diff"
    assert config_lib.from_dict({"k": 7, "unknown_key": 1}).k == 7


def test_angular_channels_must_be_positive():
    with pytest.raises(errors.ConfigError, match="--angular_channels must be >= 1, got 0"):
        config_lib.validate(config_lib.Config(model="graph", angular_channels=0))


def test_element_states_needs_the_masked_graph_model():
    for config in (config_lib.Config(model="graph", element_states=True),
                   config_lib.Config(model="tree", neighbour_elements=True,
                                     element_states=True)):
        with pytest.raises(errors.ConfigError, match="--element_states needs"):
            config_lib.validate(config)
    config_lib.validate(config_lib.Config(model="graph", neighbour_elements=True,
                                          element_states=True))
