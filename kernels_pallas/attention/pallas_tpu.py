"""Pallas (Mosaic) verification attention for TPUs.

Grid (B, KVH, cache blocks), the block axis innermost and sequential. ``prefix_len`` is a scalar-prefetch
operand, so the cache BlockSpecs clamp the block index to the row's last valid block: blocks past the prefix
map to the block already resident and cost no DMA, and their compute is skipped with ``pl.when``. The online
softmax state (running max, denominator, accumulator) lives in VMEM scratch; on the last block the new tree
tokens are folded in under their mask and the output is written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.attention.common import (NEG, cache_len_of, online_update, pack, reference_if_not_verification,
                                              unpack)
from tlt_jax.core.shapes import round_up


def _kernel(lens_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, m_scr, l_scr, acc_scr, *,
            block_s: int):
    b, i = pl.program_id(0), pl.program_id(2)
    n = lens_ref[b]

    @pl.when(i == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    q = q_ref[...]

    @pl.when(i * block_s < n)
    def _():
        slots = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        s = jax.lax.dot_general(q, kc_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(slots < n, s, NEG)
        m_scr[...], l_scr[...], acc_scr[...] = online_update(s, vc_ref[...], m_scr[...], l_scr[...],
                                                             acc_scr[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        s = jax.lax.dot_general(q, kn_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(mask_ref[...] != 0, s, NEG)
        _, l_i, acc = online_update(s, vn_ref[...], m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = (acc / jnp.where(l_i > 0, l_i, 1.0)).astype(o_ref.dtype)


def _pick_block(cache_len: int, want: int) -> int:
    """Largest block <= want (a multiple of 8) dividing cache_len; cache_len itself when it is small."""
    if cache_len <= want:
        return cache_len
    for bs in range(want - want % 8, 7, -8):
        if cache_len % bs == 0:
            return bs
    return cache_len


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None,
                     block_s: int = 512, interpret: bool = False):
    """Same contract as :func:`kernels_pallas.attention.reference.cached_attention` (cache required).

    Calls without a cache or without new tokens go to the reference.
    """
    ref = reference_if_not_verification(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len)
    if ref is not None:
        return ref
    b, t, nh, d = q.shape
    kvh = k_cache.shape[1]
    cache_len = cache_len_of(k_cache, attend_len)
    bs = _pick_block(cache_len, block_s)
    nblocks = max(1, cache_len // bs)
    m = (nh // kvh) * t
    mp, tp = round_up(m, 8), round_up(t, 8)
    pk = pack(q, k_new.astype(q.dtype), v_new.astype(q.dtype), new_mask, mp, tp)
    lens = jnp.minimum(prefix_len.astype(jnp.int32), cache_len)

    def cache_map(i, h, j, lens_ref):
        last = jnp.maximum(lens_ref[i] - 1, 0) // bs
        return i, h, jnp.minimum(j, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, nblocks),
        in_specs=[
            pl.BlockSpec((None, None, mp, d), lambda i, h, j, l: (i, h, 0, 0)),
            pl.BlockSpec((None, None, bs, d), cache_map),
            pl.BlockSpec((None, None, bs, d), cache_map),
            pl.BlockSpec((None, None, tp, d), lambda i, h, j, l: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tp, d), lambda i, h, j, l: (i, h, 0, 0)),
            pl.BlockSpec((None, mp, tp), lambda i, h, j, l: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, mp, d), lambda i, h, j, l: (i, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((mp, 1), jnp.float32), pltpu.VMEM((mp, 1), jnp.float32),
                        pltpu.VMEM((mp, d), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_s=bs),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kvh, mp, d), q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="verify_attention_tpu",
    )(lens, pk.q, k_cache, v_cache, pk.k_new, pk.v_new, pk.mask)
    return unpack(out, q.shape, pk.m)
