"""Pallas (Triton) verification attention for GPUs.

Grid (B, KVH): one program per row and KV head holds the M = G * T query rows of the group in registers,
streams the row's valid cache prefix in blocks of ``block_s`` slots (a dynamic trip count: slots beyond
``prefix_len`` are never read) with an online softmax, then folds in the T new tokens under their mask.
Triton wants power-of-two tiles, so M and T are padded (cheap: they are small) and the last cache block is
read with a bounds mask instead of padding the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.attention.common import (NEG, cache_len_of, online_update, pack, reference_if_not_verification,
                                              unpack)
from tlt_jax.core.shapes import next_pow2


def _kernel(lens_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, *, block_s: int, cache_len: int):
    q = q_ref[...]
    mp, d = q.shape
    n = lens_ref[0]

    def body(i, carry):
        m_i, l_i, acc = carry
        start = i * block_s
        slots = start + jnp.arange(block_s)
        inb = slots < cache_len
        k = plgpu.load(kc_ref.at[pl.ds(start, block_s), :], mask=inb[:, None], other=0.0)
        v = plgpu.load(vc_ref.at[pl.ds(start, block_s), :], mask=inb[:, None], other=0.0)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        s = jnp.where((slots < n)[None, :], s, NEG)
        return online_update(s, v, m_i, l_i, acc)

    init = (jnp.full((mp, 1), NEG, jnp.float32), jnp.zeros((mp, 1), jnp.float32), jnp.zeros((mp, d), jnp.float32))
    m_i, l_i, acc = jax.lax.fori_loop(0, (n + block_s - 1) // block_s, body, init)
    s = jnp.dot(q, kn_ref[...].T, preferred_element_type=jnp.float32)
    s = jnp.where(mask_ref[...] != 0, s, NEG)
    m_i, l_i, acc = online_update(s, vn_ref[...], m_i, l_i, acc)
    o_ref[...] = (acc / jnp.where(l_i > 0, l_i, 1.0)).astype(o_ref.dtype)


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None,
                     block_s: int = 64, interpret: bool = False):
    """Same contract as :func:`kernels_pallas.attention.reference.cached_attention` (cache required).

    Calls without a cache (fresh prefill) or without new tokens (decode after the cache write) go to the
    reference, which XLA already handles well.
    """
    ref = reference_if_not_verification(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len)
    if ref is not None:
        return ref
    b, t, nh, d = q.shape
    _, kvh, s_total, _ = k_cache.shape
    cache_len = cache_len_of(k_cache, attend_len)
    m = (nh // kvh) * t
    mp, tp = next_pow2(m, 16), next_pow2(t, 16)
    pk = pack(q, k_new.astype(q.dtype), v_new.astype(q.dtype), new_mask, mp, tp)
    lens = jnp.minimum(prefix_len.astype(jnp.int32), cache_len)
    kernel = functools.partial(_kernel, block_s=block_s, cache_len=cache_len)
    out = pl.pallas_call(
        kernel,
        grid=(b, kvh),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (i,)),
            pl.BlockSpec((None, None, mp, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, None, s_total, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, None, s_total, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tp, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tp, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, mp, tp), lambda i, h: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, mp, d), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, mp, d), q.dtype),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="verify_attention_gpu",
    )(lens, pk.q, k_cache, v_cache, pk.k_new, pk.v_new, pk.mask)
    return unpack(out, q.shape, pk.m)
