"""A trained model as two small files: what scoring needs, nothing for training.

  <folder>/model.json      the run definition (config, elements, input scaling), the
                           dataset build it was trained on, its test metrics, code version
  <folder>/params.msgpack  the parameters only (flax.serialization), no optimiser state

An ensemble (models of the same elements, k and mode, e.g. other seeds or architectures,
whose probabilities are averaged) has no params.msgpack: its model.json names member
folders beside it (`members`), each a saved model as above (`save_ensemble`).

Every finished training run exports one to `<workdir>/model/`; the package ships its
pretrained models the same way in `cryknn/pretrained/<name>/`. Loading one needs neither
orbax nor optax nor TensorFlow, so scoring starts fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from cryknn import config as config_lib
from cryknn import errors
from cryknn import models
from cryknn import util

MODEL_JSON = "model.json"
PARAMS = "params.msgpack"
FORMAT = 1
MEMBERS = "members"  # model.json key of an ensemble: its member folders, relative


@dataclasses.dataclass
class SavedModel:
    """A model ready to score: flax module, parameters and what they mean."""

    info: dict  # model.json: {'run': config.json of the training run, 'step', ...}
    config: config_lib.Config
    model: Any  # flax module
    params: Any  # nested dict of numpy arrays
    folder: str | None = None  # where it was loaded from (its domain.npz is there)
    members: list["SavedModel"] = dataclasses.field(default_factory=list)  # ensemble only

    @property
    def run(self) -> dict:
        return self.info["run"]

    @property
    def step(self) -> int | None:
        return self.info.get("step")

    @property
    def total_steps(self) -> int | None:
        return self.info.get("total_steps")

    @property
    def symbols(self) -> list[str]:
        return list(self.info["run"]["elements_resolved"])

    @property
    def atomic_numbers(self) -> list[int]:
        return [int(z) for z in self.info["run"]["atomic_numbers"]]

    @property
    def k(self) -> int:
        return self.config.k


def module_of_run(run: dict) -> tuple[config_lib.Config, Any]:
    """(config, flax module) a run definition (a workdir's config.json) describes."""
    config = config_lib.from_dict(run["config"])
    mean = run.get("input_mean", run.get("feature_mean"))  # feature_*: before cryknn 0.2
    std = run.get("input_std", run.get("feature_std"))
    stats = (mean, std) if mean is not None else None
    return config, models.create_model(config, len(run["elements_resolved"]), stats)


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("cryknn")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "unknown"


def save(folder: str, run: dict, params: Any, *, metrics: dict | None = None,
         step: int | None = None, total_steps: int | None = None) -> None:
    """Writes model.json and params.msgpack (atomically) into folder."""
    from flax import serialization

    os.makedirs(folder, exist_ok=True)
    params = _finite_params(params, folder)
    with util.atomic_open(os.path.join(folder, PARAMS), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    info = {"format": FORMAT, "run": run, "step": step, "total_steps": total_steps,
            "num_params": models.param_count(params), "code_version": code_version(),
            "dataset_fingerprint": run.get("dataset_fingerprint"),
            "test_metrics": _headline(metrics)}
    util.write_json(os.path.join(folder, MODEL_JSON), info)


def _headline(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keep = ("num_atoms", "accuracy", "balanced_accuracy", "top3_accuracy", "per_element",
            "intervals")
    return {key: metrics["test"][key] for key in keep if key in metrics["test"]}


def _finite_params(params: Any, where: str) -> dict:
    params = _as_numpy(params)
    leaves = [leaf for leaf in _leaves(params)]
    if not all(np.all(np.isfinite(leaf)) for leaf in leaves):
        raise errors.ModelError(f"refusing to save a model with non-finite parameters to {where}")
    return params


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {key: _as_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def exists(folder: str) -> bool:
    """Whether folder holds a saved model: model.json with params.msgpack, or an ensemble's
    model.json with its `members/` folder."""
    if not os.path.isfile(os.path.join(folder, MODEL_JSON)):
        return False
    return (os.path.isfile(os.path.join(folder, PARAMS))
            or os.path.isdir(os.path.join(folder, MEMBERS)))


def save_ensemble(folder: str, member_folders: list[str]) -> None:
    """Copies saved models of the same elements, k and mode (other seeds, or other
    architectures) into `folder/members/<i>` and writes the ensemble's model.json: the
    first member's, without its calibration, plus `members`."""
    import shutil

    if len(member_folders) < 2:
        raise errors.ModelError("an ensemble needs at least 2 members")
    loaded = [load(m) for m in member_folders]
    _check_alike(loaded, folder)
    names = []
    for i, source in enumerate(member_folders):
        name = f"{MEMBERS}/{i}"
        target = os.path.join(folder, name)
        os.makedirs(target, exist_ok=True)
        for file in (MODEL_JSON, PARAMS):
            shutil.copyfile(os.path.join(source, file), os.path.join(target, file))
        names.append(name)
    first = loaded[0].info
    info = {key: value for key, value in first.items()
            if key not in ("calibration", "checking", "test_metrics")}
    util.write_json(os.path.join(folder, MODEL_JSON), {
        **info, MEMBERS: names, "num_params": sum(m.info["num_params"] for m in loaded),
        "member_seeds": [m.config.seed for m in loaded]})


def _check_alike(members: list[SavedModel], where: str) -> None:
    """ModelError unless the members predict the same classes from the same k in the same
    mode (geometry only, or masked-atom); their architectures may differ."""
    first = members[0]
    for m in members:
        if m.members:
            raise errors.ModelError(f"{where}: an ensemble member may not be an ensemble")
        if (m.atomic_numbers != first.atomic_numbers or m.config.k != first.config.k
                or m.config.neighbour_elements != first.config.neighbour_elements):
            raise errors.ModelError(
                f"{where}: ensemble members must predict the same elements from the same k "
                f"in the same mode (geometry only or masked-atom); {m.folder} differs from "
                f"{first.folder}")


def _load_ensemble(folder: str, info: dict) -> SavedModel:
    names = info[MEMBERS]
    if not isinstance(names, list) or len(names) < 2 or not all(
            isinstance(n, str) and not os.path.isabs(n) and ".." not in n.split("/")
            for n in names):
        raise errors.ModelError(f"{os.path.join(folder, MODEL_JSON)}: '{MEMBERS}' must list "
                                f"at least 2 member folders inside {folder}")
    members = [load(os.path.join(folder, n)) for n in names]
    _check_alike(members, folder)
    return dataclasses.replace(members[0], info=info, folder=folder, members=members)


def load(folder: str) -> SavedModel:
    """The model saved in folder; ModelError (one line, naming the file) when it is missing,
    damaged, or has non-finite parameters. An ensemble loads with its `members`; its own
    config, module and params are those of its first member."""
    from flax import serialization

    path = os.path.join(folder, MODEL_JSON)
    try:
        with open(path) as f:
            info = json.load(f)
        if MEMBERS in info:
            return _load_ensemble(folder, info)
        config, model = module_of_run(info["run"])
    except FileNotFoundError:
        raise errors.ModelError(f"no saved model in {folder} ({path} not found)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.ModelError(f"cannot read {path}: {util.one_line(e, 200)}") from None
    path = os.path.join(folder, PARAMS)
    try:
        with open(path, "rb") as f:
            params = serialization.msgpack_restore(f.read())
    except FileNotFoundError:
        raise errors.ModelError(f"{path} not found") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise errors.ModelError(f"cannot read {path} (damaged?): {util.one_line(e, 160)}") \
            from None
    params = _as_numpy(params)
    if not all(np.all(np.isfinite(leaf)) for leaf in _leaves(params)):
        raise errors.ModelError(f"{path} holds non-finite parameters: not a usable model")
    check_fits(info["run"], config, model, params, os.path.join(folder, MODEL_JSON))
    return SavedModel(info, config, model, params, folder)


# Bounds on what a model.json may ask for (the research used k <= 20, hops <= 4, width
# <= 256): beyond them one atom's inputs or the parameters alone take gigabytes.
MAX_K = 100
MAX_WIDTH = 4096
MAX_INPUT_FLOATS = 2**20  # per atom: k distances of each of 1 + k + ... + k**hops nodes


def input_floats(config: config_lib.Config) -> int:
    """Floats of one atom's model inputs (its neighbourhood up to config.hops)."""
    hops = config.hops if config.model == "tree" else 0
    return config.k * sum(config.k ** h for h in range(hops + 1))


def check_fits(run: dict, config: config_lib.Config, model: Any, params: Any,
               where: str, params_name: str = PARAMS) -> None:
    """ModelError (one line naming `where`, the model.json or config.json holding `run`)
    unless the run definition is within sane bounds and describes exactly `params`."""
    try:
        _check_bounds(run, config)
    except (errors.UserError, ValueError, TypeError, KeyError) as e:
        raise errors.ModelError(f"{where}: {util.one_line(e, 200)}") from None
    stats = (run.get("input_mean", run.get("feature_mean")),
             run.get("input_std", run.get("feature_std")))
    if stats[0] is not None or stats[1] is not None:
        width = _input_width(config)
        for name, values in zip(("input_mean", "input_std"), stats):
            if not isinstance(values, list) or len(values) != width or not all(
                    isinstance(v, (int, float)) and np.isfinite(v) for v in values):
                got = (f"{len(values)} values" if isinstance(values, list)
                       else util.one_line(values, 40))
                raise errors.ModelError(f"{where}: {name} must be {width} finite numbers for "
                                        f"k = {config.k}, got {got}")
    expected = _param_shapes(model, config)
    found = {key: tuple(np.shape(leaf)) for key, leaf in _flat(params).items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[0][0]
        raise errors.ModelError(
            f"{where} does not describe the parameters in {params_name}: {diff} is "
            f"{expected.get(diff, 'absent')} for {os.path.basename(where)}, "
            f"{found.get(diff, 'absent')} in {params_name}")


def _check_bounds(run: dict, config: config_lib.Config) -> None:
    models.check_model_config(config)
    if not isinstance(config.k, int) or not 1 <= config.k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {config.k!r}")
    if config.width is not None and not 1 <= config.width <= MAX_WIDTH:
        raise ValueError(f"width must be in 1..{MAX_WIDTH}, got {config.width!r}")
    if input_floats(config) > MAX_INPUT_FLOATS:
        raise ValueError(f"k = {config.k} with {config.hops} hops gives {input_floats(config)} "
                         f"input floats per atom (limit {MAX_INPUT_FLOATS})")
    symbols, numbers = run["elements_resolved"], run["atomic_numbers"]
    if len(symbols) != len(numbers) or not 2 <= len(numbers) <= 118:
        raise ValueError(f"{len(symbols)} elements_resolved and {len(numbers)} atomic_numbers: "
                         f"need the same number of elements, 2 to 118")
    from cryknn import elements as elements_lib

    for symbol, z in zip(symbols, numbers):
        if not isinstance(z, int) or not 1 <= z <= 118 or elements_lib.symbol(z) != symbol:
            raise ValueError(f"atomic_numbers: {z!r} is not element {symbol!r}")
    if len(set(numbers)) != len(numbers):
        raise ValueError("atomic_numbers repeat an element")


def _input_width(config: config_lib.Config) -> int:
    kind = config.input_map if config.model == "mlp" else "raw"
    return int(models.map_inputs(np.ones((1, config.k)), kind).shape[1])


# Parameter shapes per (template, input spec): `_param_shapes` traces each architecture once.
_SHAPES: dict = {}
# Beside the on-disk XLA cache, when one is in use: the traced shapes of each architecture.
SHAPES_FOLDER = "cryknn_param_shapes"


def _param_shapes(model: Any, config: config_lib.Config) -> dict:
    """{'/'-joined path: shape} of the parameters `model` has (traced, nothing computed;
    once per architecture: members of an ensemble trained alike share the answer; kept
    on disk beside the XLA cache, where tracing cost a warm start 0.19 s per
    architecture)."""
    import jax

    from cryknn import input_pipeline

    spec = config_lib.input_spec(config)
    template = models.split_input_statistics(model)[0]
    key = (template, spec)
    if key not in _SHAPES:
        path = _shapes_file(template, spec)
        shapes = _read_shapes(path) if path else None
        if shapes is None:
            inputs = input_pipeline.example_inputs(spec)
            traced = jax.eval_shape(lambda: models.init_params(model, config.k,
                                                               jax.random.key(0), inputs))
            shapes = {k: tuple(leaf.shape) for k, leaf in _flat(traced).items()}
            if path:
                _write_shapes(path, shapes)
        _SHAPES[key] = shapes
    return dict(_SHAPES[key])


def _shapes_file(template: Any, spec: config_lib.InputSpec) -> str | None:
    """Where an architecture's parameter shapes are kept between runs (None without an
    on-disk XLA cache): named by a hash of the module, what it reads and cryknn's source,
    so that changed code traces again."""
    import hashlib

    import jax

    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        return None
    name = hashlib.sha256(f"{template!r}|{spec!r}|{_source_digest()}".encode()).hexdigest()
    return os.path.join(folder, SHAPES_FOLDER, f"{name[:32]}.json")


@functools.cache
def _source_digest() -> str:
    """sha256 of every cryknn source file (once per process)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _read_shapes(path: str) -> dict | None:
    """The shapes kept at path; None where there are none or they do not read."""
    try:
        with open(path) as f:
            found = json.load(f)
        return {str(k): tuple(int(n) for n in v) for k, v in found.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _write_shapes(path: str, shapes: dict) -> None:
    """Keeps the shapes at path; a cache that cannot be written is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        util.write_json(path, {k: list(v) for k, v in shapes.items()}, indent=None)
    except OSError:
        pass


def _flat(tree: Any, prefix: str = "") -> dict:
    if hasattr(tree, "items"):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}
