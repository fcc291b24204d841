"""Pallas (Triton) cached attention for GPUs: verification, chunked prefill and decode.

Grid (B, KVH, query blocks): one program per row, KV head and block of ``block_m`` query rows (of the M = G * T
rows of the group) streams the row's valid cache prefix in blocks of ``block_s`` slots (a dynamic trip count:
slots beyond ``prefix_len`` are never read) with an online softmax, then folds in the new tokens under their
mask when the call has any. Tiling the query rows keeps a program's accumulator at ``block_m`` x D whatever the
number of verified tokens, so wide trees do not spill registers. Triton wants power-of-two tiles, so M and the
new keys are padded (cheap: they are small) and the last cache block is read with a bounds mask instead of
padding the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.attention.common import (NEG, cache_len_of, cost_estimate, dot_precision, online_update, pack,
                                              unpack)
from tlt_jax.core.shapes import next_pow2


def _kernel(lens_ref, *refs, block_s: int, cache_len: int, has_new: bool, precision):
    if has_new:
        q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref = refs
    else:
        q_ref, kc_ref, vc_ref, o_ref = refs
    q = q_ref[...]
    bm, d = q.shape
    n = lens_ref[0]

    def body(i, carry):
        m_i, l_i, acc = carry
        start = i * block_s
        slots = start + jnp.arange(block_s)
        inb = slots < cache_len
        k = plgpu.load(kc_ref.at[pl.ds(start, block_s), :], mask=inb[:, None], other=0.0)
        v = plgpu.load(vc_ref.at[pl.ds(start, block_s), :], mask=inb[:, None], other=0.0)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)
        s = jnp.where((slots < n)[None, :], s, NEG)
        return online_update(s, v, m_i, l_i, acc, precision)

    init = (jnp.full((bm, 1), NEG, jnp.float32), jnp.zeros((bm, 1), jnp.float32), jnp.zeros((bm, d), jnp.float32))
    m_i, l_i, acc = jax.lax.fori_loop(0, (n + block_s - 1) // block_s, body, init)
    if has_new:
        s = jnp.dot(q, kn_ref[...].T, preferred_element_type=jnp.float32, precision=precision)
        s = jnp.where(mask_ref[...] != 0, s, NEG)
        m_i, l_i, acc = online_update(s, vn_ref[...], m_i, l_i, acc, precision)
    o_ref[...] = (acc / jnp.where(l_i > 0, l_i, 1.0)).astype(o_ref.dtype)


def launch_params(m: int, d: int) -> dict:
    """Rows per program and warps for M query rows of head dim D: at most 64 rows per program, and 8 warps from
    head dim 128 up. Compiled for sm_90 (``cuda_offline.compile_sm90``) at 28/4 heads, D = 128 and 64 verified
    tokens: 126 registers per thread and 80 KiB of shared memory with no spill (4 warps: 235 registers; the
    untiled kernel, one program for all 512 padded rows: 255 registers, the cap, and 192 KiB)."""
    bm = min(next_pow2(m, 16), 64)
    return {"block_m": bm, "num_warps": 8 if d >= 128 else 4, "num_stages": 2}


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None,
                     block_s: int = 64, interpret: bool = False):
    """Same contract as :func:`kernels_pallas.attention.reference.cached_attention`, with a cache (decode,
    verification, chunked prefill)."""
    if k_cache is None:
        raise ValueError("the GPU kernel attends over a cache; a fresh prefill goes to the reference")
    b, t, nh, d = q.shape
    _, kvh, s_total, _ = k_cache.shape
    cache_len = cache_len_of(k_cache, attend_len)
    m = (nh // kvh) * t
    lp = launch_params(m, d)
    bm = lp["block_m"]
    mp = max(next_pow2(m, 16), bm)
    has_new = k_new is not None
    jp = next_pow2(k_new.shape[1], 16) if has_new else 0
    pk = pack(q, k_new, v_new, new_mask, kvh, mp, jp)
    lens = jnp.minimum(prefix_len.astype(jnp.int32), cache_len)
    in_specs = [pl.BlockSpec((1,), lambda i, h, r: (i,)),
                pl.BlockSpec((None, None, bm, d), lambda i, h, r: (i, h, r, 0)),
                pl.BlockSpec((None, None, s_total, d), lambda i, h, r: (i, h, 0, 0)),
                pl.BlockSpec((None, None, s_total, d), lambda i, h, r: (i, h, 0, 0))]
    operands = [lens, pk.q, k_cache, v_cache]
    if has_new:
        in_specs += [pl.BlockSpec((None, None, jp, d), lambda i, h, r: (i, h, 0, 0)),
                     pl.BlockSpec((None, None, jp, d), lambda i, h, r: (i, h, 0, 0)),
                     pl.BlockSpec((None, bm, jp), lambda i, h, r: (i, r, 0))]
        operands += [pk.k_new, pk.v_new, pk.mask]
    kernel = functools.partial(_kernel, block_s=block_s, cache_len=cache_len, has_new=has_new,
                               precision=dot_precision(q.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(b, kvh, mp // bm),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bm, d), lambda i, h, r: (i, h, r, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, mp, d), q.dtype),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=lp["num_warps"],
                                                                    num_stages=lp["num_stages"]),
        cost_estimate=cost_estimate(q, k_cache, cache_len, k_new.shape[1] if has_new else 0),
        name="cached_attention_gpu",
    )(*operands)
    return unpack(out, q.shape, pk.m)
