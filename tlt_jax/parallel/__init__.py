"""Device mesh, sharding rules (as data) for parameters and rollout states, rollout replicas, multi-host."""

from tlt_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from tlt_jax.parallel.replicas import Replica, make_replicas
from tlt_jax.parallel.sharding import (PARAM_RULES, STATE_RULES, ShardingRule, batch_sharding, bytes_per_device,
                                       cache_shardings, param_shardings, shard_model, spec_for)

__all__ = ["MESH_AXES", "make_mesh", "mesh_shape", "Replica", "make_replicas", "PARAM_RULES", "STATE_RULES",
           "ShardingRule", "batch_sharding", "bytes_per_device", "cache_shardings", "param_shardings", "shard_model",
           "spec_for"]
