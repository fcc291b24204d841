"""Weight-free check of a config: the abstract model, its shardings and bytes per device (``tlt-inspect``)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from tlt_jax.app import specs
from tlt_jax.core.shapes import default_cache_len
from tlt_jax.core.trees import path_name
from tlt_jax.models.decoder import abstract_model
from tlt_jax.models.kv_cache import init_cache
from tlt_jax.parallel.sharding import bytes_per_device, cache_shardings, param_shardings


def inspect_config(config, mesh) -> dict:
    """Per-device bytes of parameters and of the rollout KV cache under the config's sharding rules."""
    cfg = specs.model_config(config)
    _, abstract_state = nnx.split(abstract_model(cfg))
    shard = param_shardings(cfg, mesh)
    paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state)]
    param_bytes = bytes_per_device(abstract_state, [shard[p] for p in paths])
    r = config.rollout
    cache_len = specs.cache_len(config) or default_cache_len(int(r.max_prompt_len), int(r.max_new_tokens))
    cache = jax.eval_shape(lambda: init_cache(cfg, int(r.batch_size), cache_len))
    cs = cache_shardings(cfg, mesh, int(r.batch_size), cache_len)
    cache_arrays = list(cache.k) + list(cache.v)
    cache_bytes = bytes_per_device(cache_arrays, [cs] * len(cache_arrays))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_state)))
    return {
        "config": config.name, "num_params": n_params, "param_dtype": cfg.param_dtype,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "param_bytes_per_device": param_bytes.tolist(),
        "param_gib_per_device_max": float(param_bytes.max() / 2 ** 30),
        "param_gib_total": float(n_params * np.dtype(cfg.jnp_param_dtype).itemsize / 2 ** 30),
        "rollout_batch": int(r.batch_size), "cache_len": cache_len,
        "kv_cache_gib_per_device_max": float(cache_bytes.max() / 2 ** 30),
        "example_shardings": {p: str(shard[p].spec) for p in paths[:12]},
    }
