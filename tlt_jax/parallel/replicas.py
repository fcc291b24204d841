"""Rollout replicas: fixed disjoint sub-meshes of the device set, each running its own rows.

A replica is a (data, tensor) mesh: rows over ``data``, the policy's heads / FFN / vocabulary over ``tensor``
(``tensor`` devices per model copy). Its rollout state is laid out by ``sharding.STATE_RULES``, its copy of the
policy by ``sharding.PARAM_RULES`` (whole on each device when ``tensor`` is 1).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.core.errors import ConfigError
from tlt_jax.parallel.sharding import STATE_RULES, to_mesh, tree_shardings


class Replica(NamedTuple):
    index: int
    devices: Tuple[jax.Device, ...]
    mesh: Mesh  # axes ("data", "tensor")
    local: bool  # every device of the replica belongs to this process

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape["data"])

    @property
    def replicated(self) -> NamedSharding:
        """Whole on every device of the replica (the drafter, the RNG key)."""
        return NamedSharding(self.mesh, P())

    def rows(self, batch: int) -> NamedSharding:
        """A [batch, ...] host array split over the replica's data axis when it divides, else whole."""
        return NamedSharding(self.mesh, P("data") if batch % self.data_size == 0 else P())

    def state_shardings(self, state):
        """The layout of a rollout state (or its abstract shapes) on this replica."""
        return tree_shardings(state, self.mesh, STATE_RULES)

    def place_policy(self, params):
        """The policy (possibly laid out over the whole training mesh) on this replica."""
        return to_mesh(params, tree_shardings(params, self.mesh))


def make_replicas(num: int, devices: Optional[Sequence[jax.Device]] = None, tensor: int = 1) -> List[Replica]:
    """``num`` disjoint sub-meshes of the devices (all of them: ``jax.devices()``), in device order, each a
    (data, tensor) mesh with ``tensor`` devices per model copy.

    With fewer devices than replicas, replicas share devices round-robin (one CPU device, say): the engine
    still splits the batch and trains on finished replicas, but they run on the same hardware.
    """
    devices = list(jax.devices() if devices is None else devices)
    num, tensor = int(num), int(tensor)
    if num < 1:
        raise ConfigError(f"need at least one rollout replica, got {num}")
    if len(devices) >= num:
        if len(devices) % num:
            raise ConfigError(f"{num} rollout replicas do not split {len(devices)} devices evenly")
        k = len(devices) // num
        groups = [devices[i * k:(i + 1) * k] for i in range(num)]
    else:
        groups = [[devices[i % len(devices)]] for i in range(num)]
    if len(groups[0]) % tensor:
        raise ConfigError(f"tlt.replica_tensor={tensor} does not divide a replica's {len(groups[0])} device(s) "
                          f"({len(devices)} devices, {num} replicas)")
    me = jax.process_index()
    return [Replica(i, tuple(g), Mesh(np.asarray(g).reshape(len(g) // tensor, tensor), ("data", "tensor")),
                    all(d.process_index == me for d in g))
            for i, g in enumerate(groups)]
