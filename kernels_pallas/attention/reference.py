"""jnp reference of cached attention; also the CPU implementation."""

from __future__ import annotations

import jax.numpy as jnp

_NEG = -1e30


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None):
    b, t, nh, d = q.shape
    parts_s, parts_v = [], []  # scores [B, KVH, G, T, *] and the matching value operands
    kvh = k_new.shape[2] if k_new is not None else k_cache.shape[1]
    g = nh // kvh
    # Queries as [B, KVH, G, T, D]: the cache dots then have (B, KVH) as batch dims and need no transpose.
    qg = jnp.moveaxis(q.reshape(b, t, kvh, g, d), 1, 3) * jnp.asarray(1.0 / d ** 0.5, q.dtype)
    f32 = jnp.float32
    if k_cache is not None:
        if attend_len is not None and attend_len < k_cache.shape[2]:
            k_cache = k_cache[:, :, :attend_len]
            v_cache = v_cache[:, :, :attend_len]
        s = k_cache.shape[2]
        s_old = jnp.einsum("bkgtd,bksd->bkgts", qg, k_cache, preferred_element_type=f32)
        valid = jnp.arange(s)[None, :] < prefix_len[:, None]  # [B, S]
        parts_s.append(jnp.where(valid[:, None, None, None, :], s_old, _NEG))
        parts_v.append(("bkgts,bksd->bkgtd", v_cache))
    if k_new is not None:
        s_new = jnp.einsum("bkgtd,bjkd->bkgtj", qg, k_new, preferred_element_type=f32)
        parts_s.append(jnp.where(new_mask[:, None, None, :, :], s_new, _NEG))
        parts_v.append(("bkgtj,bjkd->bkgtd", v_new))
    m = parts_s[0].max(-1, keepdims=True)
    for p in parts_s[1:]:
        m = jnp.maximum(m, p.max(-1, keepdims=True))
    out, denom = 0.0, 0.0
    for p, (spec, v) in zip(parts_s, parts_v):
        e = jnp.exp(p - m)
        denom = denom + e.sum(-1, keepdims=True)
        out = out + jnp.einsum(spec, e.astype(v.dtype), v, preferred_element_type=f32)
    out = out / denom  # [B, KVH, G, T, D]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, nh, d).astype(q.dtype)
