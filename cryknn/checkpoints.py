"""The workdir of a training run: its run definition, orbax checkpoints, trained models.

Workdir layout:
  config.json        the run definition: flags, resolved elements, input scaling, dataset
                     build; what prediction needs to rebuild the model
  checkpoints/<step>/  orbax: train state and per-epoch history (resume from the latest)
  model/             the params-only export (`export`; what `load_trained` reads first)
  .lock              `WorkdirLock`: one run per workdir at a time

A workdir holds one run. Resuming with a flag that defines the run changed, or with
checkpoints whose run definition is unknown (config.json missing), is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from cryknn import config as config_lib
from cryknn import errors
from cryknn import models
from cryknn import saved_model
from cryknn import util

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
ITEMS = ("state", "history")


def check_workdir(workdir: str) -> None:
    """Create workdir and prove it is writable, or raise ConfigError."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise errors.ConfigError(f"cannot write to --workdir={workdir}: {e.strerror or e}") from None


def run_definition(config: config_lib.Config, prepared: Any, input_stats: tuple | None,
                   num_params: int) -> dict:
    """config.json: the flags plus everything needed to rebuild and interpret the model."""
    mean, std = input_stats if input_stats is not None else (None, None)
    return {
        "config": dataclasses.asdict(config),
        **{name: getattr(config, name) for name in config_lib.run_defining_fields()},
        "elements_resolved": prepared.symbols,
        "atomic_numbers": prepared.element_list,
        "model_hyperparameters": models.hyperparameters(config),
        "input_mean": mean,
        "input_std": std,
        "class_weights": prepared.class_weights.tolist(),
        "train_atoms_per_element": dict(zip(prepared.symbols, prepared.train_counts.tolist())),
        "num_params": num_params,
        "dataset_fingerprint": prepared.dataset["fingerprint"],
        "dataset_build": prepared.dataset["build_info"],
    }


def _run_keys() -> tuple[str, ...]:
    return config_lib.run_defining_fields() + ("elements_resolved", "dataset_fingerprint")


def check_same_run(workdir: str, new: dict) -> None:
    """Raise ConfigError unless workdir is empty or holds the run `new` defines."""
    path = os.path.join(workdir, CONFIG_JSON)
    has_checkpoints = latest_step(workdir) is not None
    if not os.path.exists(path):
        if has_checkpoints:
            raise errors.ConfigError(
                f"--workdir={workdir} has checkpoints but no {CONFIG_JSON}, so what they were "
                f"trained on is unknown; use a new --workdir")
        return
    old = read_run(workdir)
    for key in _run_keys():
        if key in old and old[key] != new[key]:
            raise errors.ConfigError(
                f"--workdir={workdir} holds a run with {key}={old[key]!r}, not {new[key]!r}; "
                f"use a new --workdir or the same flags to resume")


def read_run(workdir: str) -> dict:
    """The workdir's config.json; ModelError when it is missing or unreadable."""
    path = os.path.join(workdir, CONFIG_JSON)
    try:
        with open(path) as f:
            run = json.load(f)
        if not isinstance(run, dict) or "config" not in run:
            raise ValueError("no 'config' entry")
        return run
    except FileNotFoundError:
        raise errors.ModelError(f"no trained model in {workdir} ({path} not found); train one "
                                f"with: python -m cryknn.main --workdir={workdir}") from None
    except (OSError, ValueError) as e:
        raise errors.ModelError(f"cannot read {path}: {util.one_line(e, 200)}") from None


def write_run(workdir: str, run: dict) -> None:
    util.write_json(os.path.join(workdir, CONFIG_JSON), run)


# ----------------------------------------------------------------------------
# Orbax checkpoints.


def manager(workdir: str, create: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create),
        item_names=ITEMS)


def latest_step(workdir: str) -> int | None:
    """The newest checkpoint step in workdir (None when there is none)."""
    folder = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return None
    steps = [int(name) for name in os.listdir(folder) if name.isdigit()]
    return max(steps) if steps else None


def save(mngr: ocp.CheckpointManager, state: Any, history: list) -> None:
    mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))


def restore(mngr: ocp.CheckpointManager, target: Any = None, log=print) -> tuple[Any, list, int]:
    """(state, history, step) of the newest intact checkpoint; a damaged newer one is
    skipped and said so. target: the state's structure (None: nested dicts of arrays)."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
            return restored["state"], list(restored["history"] or []), int(step)
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
            log(f"note: checkpoint {mngr.directory}/{step} is damaged "
                f"({util.one_line(e, 120)}); trying an older one")
    raise errors.ModelError(f"no intact checkpoint in {mngr.directory} (tried steps "
                            f"{', '.join(map(str, steps)) or 'none'})")


class WorkdirLock:
    """An exclusive lock on a workdir for the length of a run: a second run on the same
    workdir is refused instead of both writing the same checkpoints."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        import fcntl

        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise errors.ConfigError(f"--workdir={os.path.dirname(self.path)} is in use by "
                                     f"another run ({holder}); wait for it or use another "
                                     f"--workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # closing releases the lock


# ----------------------------------------------------------------------------
# A trained model read back from a workdir.

MODEL_FOLDER = "model"  # the params-only export of a finished run (cryknn.saved_model)


def load_trained(workdir: str, step: int | None = None) -> saved_model.SavedModel:
    """The model of a workdir: its params-only export when the run finished (fast), else
    the parameters of the latest (or given) checkpoint, no optimiser state.

    Raises ModelError when the workdir holds no usable trained model.
    """
    export = os.path.join(workdir, MODEL_FOLDER)
    damaged = None
    if step is None and saved_model.exists(export):
        try:
            return saved_model.load(export)
        except errors.ModelError as e:  # fall back on the checkpoints, and say so
            damaged = str(e)
    if latest_step(workdir) is None:
        if damaged:
            raise errors.ModelError(damaged)
        read_run(workdir)  # says "no trained model in ..." when there is none at all
        raise errors.ModelError(f"no checkpoints in {workdir}; train one with: "
                                f"python -m cryknn.main --workdir={workdir}")
    run = read_run(workdir)
    config, model = saved_model.module_of_run(run)
    mngr = manager(workdir, create=False)
    notes = []
    try:
        if step is not None and step != latest_step(workdir):
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), history=ocp.args.JsonRestore()))
            state, history = restored["state"], list(restored["history"] or [])
        else:
            state, history, step = restore(mngr, log=notes.append)
    finally:
        mngr.close()
    total = history[-1]["step"] * config.epochs // history[-1]["epoch"] if history else None
    info = {"run": run, "step": int(step), "total_steps": total,
            "notes": ([f"note: {damaged}; using the checkpoints instead"] if damaged else [])
            + notes}
    params = _as_numpy(state["params"])
    saved_model.check_fits(run, config, model, params, os.path.join(workdir, CONFIG_JSON),
                           "the checkpoint")
    return saved_model.SavedModel(info, config, model, params)


def export(workdir: str, params: Any, run: dict, metrics: dict, step: int,
           total_steps: int) -> str:
    """Writes the params-only model of a finished run to <workdir>/model; returns the path."""
    folder = os.path.join(workdir, MODEL_FOLDER)
    saved_model.save(folder, run, params, metrics=metrics, step=step, total_steps=total_steps)
    return folder


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _as_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)
