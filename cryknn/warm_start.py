"""Warm start: initialise a model on k' = k + m distances from a trained model on k distances.

The (k + m)-model starts exactly where the k-model was: every parameter is copied, and the
input-layer rows that read the m new distances start at zero, so at step 0 the new model's
outputs equal the old model's outputs on the first k distances (up to float rounding).
Training then continues from there and the new rows learn what the extra neighbours add.

Where the inputs enter each model (cryknn.models):
- `MLPModel` ('mlp'): f = map_inputs(d) is the k distances ('raw'), or [1/d_1..1/d_k,
  log d_1..log d_k, d_2-d_1..d_k-d_{k-1}] (3k - 1 features, 'inverse_log_diff'), standardised as
  (f - mean) / std, then Dense 'embed' (3k - 1, width). The old feature j sits at a new
  position p(j) in the (3k' - 1) layout (`feature_positions`). Because the k'-model has its
  own training statistics (mean', std'), the copied rows are rescaled and the bias shifted
  so that the standardisation change cancels exactly:
      W'[p(j)] = W[j] * std'[p(j)] / std[j]
      b'       = b + sum_j W[j] * (mean'[p(j)] - mean[j]) / std[j]
  (when the statistics agree, as they do for the same training atoms, this is a plain copy).
- `TwoStageModel` ('two_stage'): Dense 'stage1_dense0' reads the k raw distances (rows
  0..k-1) and Dense 'stage2_dense0' reads [distances (k) ++ stage-1 probabilities (C)]; the
  old rows are copied to rows 0..k-1 and k'..k'+C-1 respectively. No input scaling.
- `GraphModel` ('graph') and `TreeModel` ('tree'): every node's standardised k distances
  enter through Dense 'encode_in', whose rows are copied and rescaled as the mlp's 'embed';
  everything else is copied (no other parameter depends on k). This is NOT exact at step 0:
  the k'-model's nodes average the messages of k' neighbours instead of k (and see
  k'-neighbourhoods hops away), so its outputs start near, not at, the old model's;
  training continues from there.

API: `warm_start_params(old_model, old_params, new_model, new_params)` on Flax modules and
param pytrees (new_params only gives shapes and dtypes, e.g. `models.init_params`), and
`warm_start_trainer(trainer, trained)` to load a trained workdir (`checkpoints.load_trained`)
into a fresh `train.Trainer` for the larger k before `trainer.fit()`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from cryknn import errors
from cryknn import models


def feature_positions(input_map: str, k_old: int, k_new: int) -> np.ndarray:
    """(F_old,) int: position in the k_new model's feature vector of each k_old feature."""
    if k_new < k_old:
        raise errors.WarmStartError(f"cannot warm start to fewer distances (k {k_old} -> {k_new})")
    if input_map == "raw":
        return np.arange(k_old)
    if input_map == "inverse_log_diff":
        return np.concatenate([np.arange(k_old), k_new + np.arange(k_old),
                               2 * k_new + np.arange(k_old - 1)]).astype(np.int64)
    raise errors.WarmStartError(f"unknown input map {input_map!r}")


def _k_of(model: Any) -> int:
    n = len(model.input_mean)
    return n if getattr(model, "input_map", "raw") == "raw" else (n + 1) // 3


def _check_same_architecture(old: Any, new: Any) -> None:
    if type(old) is not type(new):
        raise errors.WarmStartError(f"cannot warm start a {type(new).__name__} from a "
                                    f"{type(old).__name__}")
    ignore = {"input_mean", "input_std", "parent", "name"}
    for field in getattr(old, "__dataclass_fields__", {}):
        if field in ignore:
            continue
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            raise errors.WarmStartError(f"models differ in {field} ({a!r} vs {b!r}); only the "
                                        f"number of distances may change")


def _copy_tree(old: Any, new: Any, skip: set[str], path: str = "") -> Any:
    """new's structure with old's values (shapes must match) except at paths in skip."""
    if isinstance(new, dict) or hasattr(new, "items"):
        missing = set(new) ^ set(old)
        if missing:
            raise errors.WarmStartError(f"parameter trees differ at {path or '/'}: "
                                        f"{sorted(missing)}")
        return {key: (new[key] if f"{path}/{key}" in skip
                      else _copy_tree(old[key], new[key], skip, f"{path}/{key}"))
                for key in new}
    old_arr, new_arr = np.asarray(old), np.asarray(new)
    if old_arr.shape != new_arr.shape:
        raise errors.WarmStartError(f"parameter {path} has shape {old_arr.shape} in the old "
                                    f"model and {new_arr.shape} in the new one")
    return old_arr.astype(new_arr.dtype)


def warm_start_params(old_model: Any, old_params: Any, new_model: Any, new_params: Any) -> dict:
    """Parameters for new_model (k' distances) that reproduce old_model (k <= k' distances).

    old_params: trained params of old_model; new_params: any params of new_model (only their
    structure, shapes and dtypes are used). Returns a nested dict of numpy arrays.
    Raises WarmStartError when the models differ in anything but k (and feature statistics).
    """
    _check_same_architecture(old_model, new_model)
    old_params = jax.device_get(old_params)
    new_params = jax.device_get(new_params)
    if isinstance(old_model, models.MLPModel):
        return _warm_start_input_layer(old_model, old_params, new_model, new_params, "embed")
    if isinstance(old_model, models.NeighbourhoodModel):
        return _warm_start_input_layer(old_model, old_params, new_model, new_params,
                                       "encode_in")
    if isinstance(old_model, models.TwoStageModel):
        return _warm_start_two_stage(old_params, new_params)
    raise errors.WarmStartError(f"no warm start for {type(old_model).__name__}")


def _warm_start_input_layer(old_model, old_params, new_model, new_params, layer: str) -> dict:
    """Copy everything; rows of the input layer `layer` move to their new positions,
    rescaled for the new input statistics (see the module docstring)."""
    k_old, k_new = _k_of(old_model), _k_of(new_model)
    pos = feature_positions(getattr(old_model, "input_map", "raw"), k_old, k_new)
    out = _copy_tree(old_params, new_params, {f"/{layer}"})
    w_old = np.asarray(old_params[layer]["kernel"], np.float64)  # (F_old, width)
    b_old = np.asarray(old_params[layer]["bias"], np.float64)
    new_kernel = np.asarray(new_params[layer]["kernel"])
    if w_old.shape[0] != len(pos) or new_kernel.shape[0] <= pos.max(initial=-1):
        raise errors.WarmStartError(f"{layer} kernels {w_old.shape} -> {new_kernel.shape} do "
                                    f"not match k {k_old} -> {k_new}")
    mean_old = np.asarray(old_model.input_mean, np.float64)
    std_old = np.asarray(old_model.input_std, np.float64)
    mean_new = np.asarray(new_model.input_mean, np.float64)[pos]
    std_new = np.asarray(new_model.input_std, np.float64)[pos]
    kernel = np.zeros(new_kernel.shape, np.float64)
    kernel[pos] = w_old * (std_new / std_old)[:, None]
    bias = b_old + ((mean_new - mean_old) / std_old) @ w_old
    out[layer] = {"kernel": kernel.astype(new_kernel.dtype),
                  "bias": bias.astype(np.asarray(new_params[layer]["bias"]).dtype)}
    return out


def _warm_start_two_stage(old_params, new_params) -> dict:
    k_old = np.asarray(old_params["stage1_dense0"]["kernel"]).shape[0]
    k_new = np.asarray(new_params["stage1_dense0"]["kernel"]).shape[0]
    if k_new < k_old:
        raise errors.WarmStartError(f"cannot warm start to fewer distances (k {k_old} -> {k_new})")
    out = _copy_tree(old_params, new_params, {"/stage1_dense0", "/stage2_dense0"})
    for name in ("stage1_dense0", "stage2_dense0"):
        w_old = np.asarray(old_params[name]["kernel"])
        template = np.asarray(new_params[name]["kernel"])
        rows = np.arange(k_old)
        if name == "stage2_dense0":  # [distances (k) ++ stage-1 probabilities (C)]
            num_classes = w_old.shape[0] - k_old
            if template.shape[0] - k_new != num_classes:
                raise errors.WarmStartError("stage-2 input widths do not match the class count")
            rows = np.concatenate([rows, k_new + np.arange(num_classes)])
        kernel = np.zeros(template.shape, template.dtype)
        kernel[rows] = w_old
        out[name] = {"kernel": kernel,
                     "bias": np.asarray(old_params[name]["bias"]).astype(template.dtype)}
    return out


def warm_start_trainer(trainer: Any, trained: Any) -> None:
    """Replace the parameters of a fresh `train.Trainer` (k' distances) by a warm start from
    `trained` (`checkpoints.load_trained(workdir)` of a k <= k' run on the same elements).

    The optimiser state stays fresh (step 0, new learning-rate schedule); only the
    parameters carry over. Raises WarmStartError on a mismatch (elements, model, size).
    """
    if list(trained.symbols) != list(trainer.data.symbols):
        raise errors.WarmStartError(f"the trained model classifies {','.join(trained.symbols)}, "
                                    f"the new run {','.join(trainer.data.symbols)}")
    params = warm_start_params(trained.model, trained.params, trainer.model,
                               jax.device_get(trainer.state.params))
    trainer.state = trainer.state.replace(params=trainer.parallel.replicate(params))
