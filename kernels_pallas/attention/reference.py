"""jnp reference of cached attention; also the CPU implementation."""

from __future__ import annotations

import jax.numpy as jnp

_NEG = -1e30


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None):
    b, t, nh, d = q.shape
    parts_s, parts_v = [], []  # scores [B, KVH, *, G*T] (keys major) and the matching value operands
    kvh = k_new.shape[2] if k_new is not None else k_cache.shape[1]
    g = nh // kvh
    # Queries as [B, KVH, G*T, D] (query index = g * T + t). The score dots put the keys first ([B, KVH, S, G*T]):
    # with the cache as the dot's left operand and its S rows as the long dimension, the CPU dot runs about twice
    # as fast as with the few queries first, and the cache dots need no transpose.
    qg = jnp.moveaxis(q.reshape(b, t, kvh, g, d), 1, 3).reshape(b, kvh, g * t, d) * jnp.asarray(1.0 / d ** 0.5,
                                                                                               q.dtype)
    f32 = jnp.float32
    if k_cache is not None:
        if attend_len is not None and attend_len < k_cache.shape[2]:
            k_cache = k_cache[:, :, :attend_len]
            v_cache = v_cache[:, :, :attend_len]
        s = k_cache.shape[2]
        s_old = jnp.einsum("bksd,bkqd->bksq", k_cache, qg, preferred_element_type=f32)
        valid = jnp.arange(s)[None, :] < prefix_len[:, None]  # [B, S]
        parts_s.append(jnp.where(valid[:, None, :, None], s_old, _NEG))
        parts_v.append(("bksq,bksd->bkqd", v_cache))
    if k_new is not None:
        s_new = jnp.einsum("bjkd,bkqd->bkjq", k_new, qg, preferred_element_type=f32)
        # new_mask [B, T, J] -> [B, J, G*T] (query g * T + t sees key j iff new_mask[b, t, j])
        mask = jnp.tile(jnp.swapaxes(new_mask, 1, 2), (1, 1, g))
        parts_s.append(jnp.where(mask[:, None], s_new, _NEG))
        parts_v.append(("bkjq,bjkd->bkqd", v_new))
    m = parts_s[0].max(-2, keepdims=True)
    for p in parts_s[1:]:
        m = jnp.maximum(m, p.max(-2, keepdims=True))
    out, denom = 0.0, 0.0
    for p, (spec, v) in zip(parts_s, parts_v):
        e = jnp.exp(p - m)
        denom = denom + e.sum(-2)
        out = out + jnp.einsum(spec, e.astype(v.dtype), v, preferred_element_type=f32)
    out = out / denom[..., None]  # [B, KVH, G*T, D]
    out = out.reshape(b, kvh, g, t, d)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, nh, d).astype(q.dtype)
