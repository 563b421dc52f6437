"""The forward pass of a saved model, or of each member of an ensemble: jitted once per
architecture, fed what that member reads.

  members = forwards(saved.members or [saved])    # one MemberForward each
  probs = predict(members[0], table, rows, classes, batch_size=4096)  # (R, C)

A tree model (`InputSpec.reads` 'tree' or 'atoms') reads each atom's inputs gathered on
the host (`input_pipeline.gather_inputs`); a graph model reads whole structures (crops of
big ones) packed on the host (`graph_batch.inference_packs`). Members of one ensemble may
read either.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from cryknn import config as config_lib
from cryknn import features
from cryknn import input_pipeline
from cryknn import saved_model


class MemberForward(NamedTuple):
    """One member's jitted forward pass (`jit_probs`), its weights (params, input
    statistics or None) and what it reads (`config.InputSpec`)."""

    probs_fn: Callable
    weights: tuple
    spec: config_lib.InputSpec


def jit_probs(template):
    """jit of (weights, inputs, temperature) -> softmax(logits / temperature), where
    weights = (params, input statistics or None) and `template` is the module without its
    statistics (`models.split_input_statistics`): the statistics are arguments, so members
    trained alike share one trace (each trace of an ensemble member cost a one-structure
    check 0.25 s)."""
    import jax

    def probs(weights, inputs, t):
        params, stats = weights
        module = template if stats is None else template.clone(input_mean=stats[0],
                                                               input_std=stats[1])
        logits = module.apply({"params": params}, inputs, train=False)["logits"]
        return jax.nn.softmax(logits / t, -1)

    return jax.jit(probs)


def forwards(members: Sequence[saved_model.SavedModel]) -> list[MemberForward]:
    """The forward pass of each member; members with the same template share the
    function."""
    from cryknn import models

    shared: dict = {}
    out = []
    for member in members:
        template, stats = models.split_input_statistics(member.model)
        if template not in shared:
            shared[template] = jit_probs(template)
        weights = (member.params, None if stats is None else
                   tuple(np.asarray(v, np.float32) for v in stats))
        out.append(MemberForward(shared[template], weights,
                                 config_lib.input_spec(member.config)))
    return out


def widest_spec(specs: Sequence[config_lib.InputSpec]) -> config_lib.InputSpec:
    """The spec with the largest receptive field (the first on a tie): which atoms an
    ensemble's prediction of an atom depends on."""
    return max(specs, key=lambda spec: spec.receptive_hops)


def predict(member: MemberForward, table: features.AtomTable, rows: np.ndarray,
            classes: int, batch_size: int = 4096, temperature: float = 1.0) -> np.ndarray:
    """(R, classes) probabilities of the table's atoms at `rows` (R,) under one member."""
    read = _predict_graph if member.spec.reads == "graph" else _predict_rows
    return read(member, table, rows, classes, batch_size, temperature)


def _predict_rows(member: MemberForward, table: features.AtomTable, rows: np.ndarray,
                  classes: int, batch_size: int, temperature: float) -> np.ndarray:
    """Each atom's inputs gathered on the host, in batches of at most `batch_size`."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        size = min(batch_size, 1 << max(0, int(len(chunk) - 1).bit_length()))
        padded = np.pad(chunk, (0, size - len(chunk)), mode="edge")  # few shapes to compile
        inputs = input_pipeline.gather_inputs(table, padded, member.spec)
        out.append(np.asarray(member.probs_fn(member.weights, inputs,
                                              np.float32(temperature)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, classes), np.float32)


def _predict_graph(member: MemberForward, table: features.AtomTable, rows: np.ndarray,
                   classes: int, batch_size: int, temperature: float) -> np.ndarray:
    """Whole structures (crops of big ones) in packs of at most `batch_size` slots: one
    forward pass per pack, every atom's state computed once per hop."""
    from cryknn import graph_batch

    probs = np.zeros((len(rows), classes), np.float32)
    for pack in graph_batch.inference_packs(
            table, rows, member.spec.receptive_hops, batch_size,
            with_elements=member.spec.neighbour_elements):
        inputs = graph_batch.stack([pack])[0]
        out = np.asarray(member.probs_fn(member.weights, inputs, np.float32(temperature)))[0]
        keep = pack.loss_position >= 0
        probs[pack.loss_position[keep]] = out[keep]
    return probs
