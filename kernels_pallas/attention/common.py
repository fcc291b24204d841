"""Layout shared by the Pallas verification-attention kernels.

Both kernels work per (row b, KV head h) on a *query block* of M = G * T rows: the G query heads of the group
times the T new tokens, ordered (g, t). Row m = g * T + t may attend to the first ``prefix_len[b]`` cache slots
and to the new tokens j with ``new_mask[b, t, j]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.attention import reference

NEG = -1e30


def reference_if_not_verification(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len):
    """The kernels take calls with a cache prefix *and* new tokens; the others (fresh prefill, decode after the
    cache write) are answered by the reference, which XLA handles well. Returns None for the kernel's calls."""
    if k_cache is not None and k_new is not None:
        return None
    return reference.cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len=attend_len)


def cache_len_of(k_cache, attend_len) -> int:
    s_total = k_cache.shape[2]
    return s_total if attend_len is None else min(int(attend_len), s_total)


class Packed(NamedTuple):
    q: jax.Array       # [B, KVH, Mp, D], pre-scaled by 1/sqrt(D)
    k_new: jax.Array   # [B, KVH, Tp, D]
    v_new: jax.Array   # [B, KVH, Tp, D]
    mask: jax.Array    # [B, Mp, Tp] int32 (1: may attend)
    m: int             # real number of query rows (G * T)


def pack(q, k_new, v_new, new_mask, m_pad: int, t_pad: int) -> Packed:
    """Regroups queries per KV head and pads rows/new tokens to ``m_pad`` / ``t_pad`` (padding never attends)."""
    b, t, nh, d = q.shape
    kvh = k_new.shape[2]
    g = nh // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    qg = qg * jnp.asarray(1.0 / d ** 0.5, q.dtype)
    m = g * t
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, m_pad - m), (0, 0)))
    kn = jnp.pad(k_new.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    vn = jnp.pad(v_new.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    mask = jnp.tile(new_mask.astype(jnp.int32), (1, g, 1))  # row g * T + t -> new_mask[:, t]
    mask = jnp.pad(mask, ((0, 0), (0, m_pad - m), (0, t_pad - t)))
    return Packed(qg, kn, vn, mask, m)


def unpack(out: jax.Array, q_shape, m: int) -> jax.Array:
    """[B, KVH, Mp, D] kernel output -> [B, T, NH, D]."""
    b, t, nh, d = q_shape
    kvh = out.shape[1]
    g = nh // kvh
    o = out[:, :, :m].reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
    return o.reshape(b, t, nh, d)


def online_update(s, v, m_prev, l_prev, acc_prev):
    """One online-softmax step: scores s [M, N] (NEG where masked) against values v [N, D]."""
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(s > NEG / 2, jnp.exp(s - m_new), 0.0)  # a row with nothing visible yet adds nothing
    l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    acc = alpha * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, acc
