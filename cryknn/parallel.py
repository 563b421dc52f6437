"""Data parallelism over every device of every process, and cross-process sums.

One 1-D mesh ('data',) from `jax.make_mesh`; batches are sharded along it with
`NamedSharding(mesh, P('data'))`, parameters and optimiser state are replicated, and XLA
inserts the gradient all-reduce. Each process feeds its local slice of every global batch
(`jax.make_array_from_process_local_data`). With one process, every collective here is
the identity.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np


def global_sum(x: np.ndarray) -> np.ndarray:
    """Sum of a host numpy array over processes (identity with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def global_min(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    return int(np.min(multihost_utils.process_allgather(np.asarray(x))))


def global_max(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    return int(np.max(multihost_utils.process_allgather(np.asarray(x))))


def log(message: str) -> None:
    """Print on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


@dataclasses.dataclass
class DataParallel:
    """The mesh and shardings of data-parallel training."""

    mesh: jax.sharding.Mesh
    data: NamedSharding
    replicated: NamedSharding

    @classmethod
    def create(cls, devices: Sequence[jax.Device] | None = None) -> "DataParallel":
        """Mesh over `devices` (default: every device of every process)."""
        devices = jax.devices() if devices is None else list(devices)
        # Auto axes: XLA propagates the batch sharding (and inserts the gradient all-reduce)
        # through ops such as dropout's random mask without per-op annotations.
        mesh = jax.make_mesh((len(devices),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        return cls(mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy batch (a dict of arrays) -> global arrays sharded on 'data'."""
        return jax.tree.map(
            lambda value: jax.make_array_from_process_local_data(self.data, value), local)

    def local(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a 'data'-sharded global array."""
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, P("data")))

    def replicate(self, tree):
        """A pytree of host values (the same on every process) -> replicated global arrays."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), self.replicated, lambda index: np.asarray(x)[index]), tree)

    def jit_step(self, step: Callable, num_replicated_args: int):
        """jit of step(state, batch, *replicated) -> (state, metrics): the state is donated
        and replicated, the batch sharded along 'data', the outputs replicated."""
        return jax.jit(step, donate_argnums=0,
                       in_shardings=(self.replicated, self.data)
                       + (self.replicated,) * num_replicated_args,
                       out_shardings=(self.replicated, self.replicated))

    def jit_predict(self, predict: Callable):
        """jit of predict(params, batch) -> (B, C), batch and output sharded along 'data'."""
        return jax.jit(predict, in_shardings=(self.replicated, self.data),
                       out_shardings=self.data)
