"""jnp reference of cached attention; also the CPU implementation.

Two formulations compute the same thing:

* keys-major (float32 / float64): scores laid out [B, KVH, S, G*T]. The cache is the score dot's left
  operand and its S rows are the long dimension; on CPU this dot runs about twice as fast as with the few
  queries first, which is what a decode step at large batch spends its attention time on.
* queries-major (other dtypes): scores [B, KVH, G, T, S]. XLA's CPU dot has no bfloat16 x bfloat16 -> float32
  kernel for the keys-major operand order, so low-precision inputs keep this layout.
"""

from __future__ import annotations

import jax.numpy as jnp

_NEG = -1e30
_KEYS_MAJOR_DTYPES = (jnp.float32, jnp.float64)


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None):
    if k_cache is not None and attend_len is not None and attend_len < k_cache.shape[2]:
        k_cache = k_cache[:, :, :attend_len]
        v_cache = v_cache[:, :, :attend_len]
    kv = k_cache if k_cache is not None else k_new
    if q.dtype in _KEYS_MAJOR_DTYPES and kv.dtype in _KEYS_MAJOR_DTYPES:
        return keys_major(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask)
    return queries_major(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask)


def _softmax_combine(parts_s, parts_v, axis):
    """Softmax over the key axis ``axis`` jointly across the score parts, then the value dots."""
    m = parts_s[0].max(axis, keepdims=True)
    for p in parts_s[1:]:
        m = jnp.maximum(m, p.max(axis, keepdims=True))
    out, denom = 0.0, 0.0
    for p, (spec, v) in zip(parts_s, parts_v):
        e = jnp.exp(p - m)
        denom = denom + e.sum(axis, keepdims=True)
        out = out + jnp.einsum(spec, e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, denom


def keys_major(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask):
    b, t, nh, d = q.shape
    kvh = k_new.shape[2] if k_new is not None else k_cache.shape[1]
    g = nh // kvh
    # queries as [B, KVH, G*T, D] (query index g * T + t)
    qg = jnp.moveaxis(q.reshape(b, t, kvh, g, d), 1, 3).reshape(b, kvh, g * t, d) * jnp.asarray(1.0 / d ** 0.5,
                                                                                               q.dtype)
    parts_s, parts_v = [], []  # scores [B, KVH, keys, G*T] and the matching value operands
    if k_cache is not None:
        s_old = jnp.einsum("bksd,bkqd->bksq", k_cache, qg, preferred_element_type=jnp.float32)
        valid = jnp.arange(k_cache.shape[2])[None, :] < prefix_len[:, None]  # [B, S]
        parts_s.append(jnp.where(valid[:, None, :, None], s_old, _NEG))
        parts_v.append(("bksq,bksd->bkqd", v_cache))
    if k_new is not None:
        s_new = jnp.einsum("bjkd,bkqd->bkjq", k_new, qg, preferred_element_type=jnp.float32)
        mask = jnp.tile(jnp.swapaxes(new_mask, 1, 2), (1, 1, g))  # [B, J, G*T]: query g*T+t sees key j
        parts_s.append(jnp.where(mask[:, None], s_new, _NEG))
        parts_v.append(("bkjq,bjkd->bkqd", v_new))
    out, denom = _softmax_combine(parts_s, parts_v, axis=-2)
    out = out / jnp.swapaxes(denom, -1, -2)  # [B, KVH, G*T, D]
    return jnp.moveaxis(out.reshape(b, kvh, g, t, d), 3, 1).reshape(b, t, nh, d).astype(q.dtype)


def queries_major(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask):
    b, t, nh, d = q.shape
    kvh = k_new.shape[2] if k_new is not None else k_cache.shape[1]
    g = nh // kvh
    # queries as [B, KVH, G, T, D]: the cache dots then have (B, KVH) as batch dims and need no transpose
    qg = jnp.moveaxis(q.reshape(b, t, kvh, g, d), 1, 3) * jnp.asarray(1.0 / d ** 0.5, q.dtype)
    parts_s, parts_v = [], []  # scores [B, KVH, G, T, keys] and the matching value operands
    if k_cache is not None:
        s_old = jnp.einsum("bkgtd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
        valid = jnp.arange(k_cache.shape[2])[None, :] < prefix_len[:, None]  # [B, S]
        parts_s.append(jnp.where(valid[:, None, None, None, :], s_old, _NEG))
        parts_v.append(("bkgts,bksd->bkgtd", v_cache))
    if k_new is not None:
        s_new = jnp.einsum("bkgtd,bjkd->bkgtj", qg, k_new, preferred_element_type=jnp.float32)
        parts_s.append(jnp.where(new_mask[:, None, None, :, :], s_new, _NEG))
        parts_v.append(("bkgtj,bjkd->bkgtd", v_new))
    out, denom = _softmax_combine(parts_s, parts_v, axis=-1)
    out = out / denom  # [B, KVH, G, T, D]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, nh, d).astype(q.dtype)
