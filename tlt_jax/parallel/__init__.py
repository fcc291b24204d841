"""Device mesh, sharding rules for parameters and caches."""

from tlt_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape_from_config
from tlt_jax.parallel.sharding import (batch_sharding, bytes_per_device, cache_shardings, param_shardings,
                                       shard_model, spec_for)

__all__ = ["MESH_AXES", "make_mesh", "mesh_shape_from_config", "batch_sharding", "bytes_per_device",
           "cache_shardings", "param_shardings", "shard_model", "spec_for"]
