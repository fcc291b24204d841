"""Dense KV cache: one [B, KVH, S, D] key and value array per layer and a per-row length.

The heads-major layout lets the attention dots read the cache without transposing it.

Invariant: slot ``s`` of row ``b`` holds the token at position ``s``; slots ``s < lengths[b]`` are valid.
"""

from __future__ import annotations

from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp

from tlt_jax.models.config import ModelConfig, to_dtype


@flax.struct.dataclass
class KVCache:
    k: Tuple[jax.Array, ...]  # num_layers x [B, KVH, S, D]
    v: Tuple[jax.Array, ...]  # num_layers x [B, KVH, S, D]
    lengths: jax.Array  # [B] int32

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """Allocates an empty cache; ``dtype`` defaults to the model's compute dtype."""
    dtype = to_dtype(dtype) if dtype is not None else cfg.jnp_dtype
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    dtype = to_dtype(dtype) if dtype is not None else cfg.jnp_dtype
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
