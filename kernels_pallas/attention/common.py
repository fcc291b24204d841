"""Layout shared by the Pallas cached-attention kernels.

Both kernels work per (row b, KV head h) on a *query block* of M = G * T rows: the G query heads of the group
times the T queries, ordered (g, t), tiled into blocks of ``block_m`` rows. Row m = g * T + t may attend to the
first ``prefix_len[b]`` cache slots and, when the call has new tokens, to the new keys j with
``new_mask[b, t, j]``. Two kinds of call reach the kernels: verification and chunked prefill (a cache prefix
plus new tokens) and decode (the new token already written to the cache: cache only).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30


def cache_len_of(k_cache, attend_len) -> int:
    s_total = k_cache.shape[2]
    return s_total if attend_len is None else min(int(attend_len), s_total)


def dot_precision(dtype):
    """float32 inputs are multiplied at full precision: the GPU default for them is TF32 (10 mantissa bits),
    which would not hold the reference's tolerance. Low-precision inputs use the native MXU / tensor-core dot."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def cost_estimate(q, k_cache, cache_len: int, num_new: int):
    """What a kernel call costs at most (every row's prefix as long as ``cache_len``), for XLA's cost analysis,
    which cannot see inside a custom call: the score and value dots over the cache and the new keys, one exp per
    score, and the bytes of the queries, the cache prefix read, the new keys / values and the output."""
    b, t, nh, d = q.shape
    kvh = k_cache.shape[1]
    keys = cache_len + num_new
    item = jnp.dtype(q.dtype).itemsize
    read = 2 * b * kvh * cache_len * d * jnp.dtype(k_cache.dtype).itemsize + 2 * b * num_new * kvh * d * item
    return pl.CostEstimate(flops=4 * b * nh * t * keys * d, transcendentals=b * nh * t * keys,
                           bytes_accessed=int(read + 2 * b * t * nh * d * item))


class Packed(NamedTuple):
    q: jax.Array                 # [B, KVH, Mp, D], pre-scaled by 1/sqrt(D)
    k_new: Optional[jax.Array]   # [B, KVH, Jp, D] (None: decode, no new tokens)
    v_new: Optional[jax.Array]   # [B, KVH, Jp, D]
    mask: Optional[jax.Array]    # [B, Mp, Jp] int32 (1: may attend)
    m: int                       # real number of query rows (G * T)


def pack(q, k_new, v_new, new_mask, kvh: int, m_pad: int, j_pad: int) -> Packed:
    """Regroups queries per KV head and pads rows / new keys to ``m_pad`` / ``j_pad`` (padding never attends).
    Without new tokens (``k_new`` None) only the queries are packed."""
    qg, m = pack_queries(q, kvh, m_pad)
    if k_new is None:
        return Packed(qg, None, None, None, m)
    g = q.shape[2] // kvh
    j = k_new.shape[1]
    kn = jnp.pad(k_new.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, j_pad - j), (0, 0)))
    vn = jnp.pad(v_new.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, j_pad - j), (0, 0)))
    mask = jnp.tile(new_mask.astype(jnp.int32), (1, g, 1))  # row g * T + t -> new_mask[:, t]
    mask = jnp.pad(mask, ((0, 0), (0, m_pad - m), (0, j_pad - j)))
    return Packed(qg, kn, vn, mask, m)


def pack_queries(q, kvh: int, m_pad: int):
    """Queries [B, T, NH, D] as [B, KVH, m_pad, D] (row g * T + t, scaled by 1/sqrt(D)) and the real row count."""
    b, t, nh, d = q.shape
    g = nh // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    qg = qg * jnp.asarray(1.0 / d ** 0.5, q.dtype)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, m_pad - g * t), (0, 0))), g * t


def unpack(out: jax.Array, q_shape, m: int) -> jax.Array:
    """[B, KVH, Mp, D] kernel output -> [B, T, NH, D]."""
    b, t, nh, d = q_shape
    kvh = out.shape[1]
    g = nh // kvh
    o = out[:, :, :m].reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
    return o.reshape(b, t, nh, d)


def online_update(s, v, m_prev, l_prev, acc_prev, precision=None):
    """One online-softmax step: scores s [M, N] (NEG where masked) against values v [N, D]."""
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(s > NEG / 2, jnp.exp(s - m_new), 0.0)  # a row with nothing visible yet adds nothing
    l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    acc = alpha * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return m_new, l_new, acc
