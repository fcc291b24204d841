"""Pallas (Mosaic) cached attention for TPUs: verification, chunked prefill and decode.

Grid (B, KVH, query blocks, cache blocks), the cache-block axis innermost and sequential. ``prefix_len`` is a
scalar-prefetch operand, so the cache BlockSpecs clamp the block index to the row's last valid block: blocks
past the prefix map to the block already resident and cost no DMA, and their compute is skipped with
``pl.when``. The online softmax state (running max, denominator, accumulator) lives in VMEM scratch; on the
last block the new tokens (if the call has any) are folded in under their mask and the output is written once.

Block shapes follow Mosaic's rule (the last two dimensions of a block are multiples of the (8, 128) tile, or
the array's own): a cache block is a multiple of 16 slots (also the bfloat16 sublane tile) or the whole cache,
and the last block may run past ``attend_len`` or the array's end (those slots are masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.attention.common import (NEG, cache_len_of, cost_estimate, dot_precision, online_update, pack,
                                              unpack)
from tlt_jax.core.shapes import round_up

_ALIGN = 16


def _kernel(lens_ref, *refs, block_s: int, has_new: bool, precision):
    if has_new:
        q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, kc_ref, vc_ref, o_ref, m_scr, l_scr, acc_scr = refs
    b, i = pl.program_id(0), pl.program_id(3)
    n = lens_ref[b]

    @pl.when(i == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    q = q_ref[...]
    dims = (((1,), (1,)), ((), ()))

    @pl.when(i * block_s < n)
    def _():
        slots = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        s = jax.lax.dot_general(q, kc_ref[...], dims, preferred_element_type=jnp.float32, precision=precision)
        s = jnp.where(slots < n, s, NEG)
        # slots past the prefix (stale, or past the array's end in the last block) may hold anything, NaN
        # included: a zero weight would not cancel them in the value dot
        rows = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        v = jnp.where(rows < n, vc_ref[...], jnp.zeros((), vc_ref.dtype))
        m_scr[...], l_scr[...], acc_scr[...] = online_update(s, v, m_scr[...], l_scr[...], acc_scr[...], precision)

    @pl.when(i == pl.num_programs(3) - 1)
    def _():
        l_i, acc = l_scr[...], acc_scr[...]
        if has_new:
            s = jax.lax.dot_general(q, kn_ref[...], dims, preferred_element_type=jnp.float32, precision=precision)
            s = jnp.where(mask_ref[...] != 0, s, NEG)
            _, l_i, acc = online_update(s, vn_ref[...], m_scr[...], l_i, acc, precision)
        o_ref[...] = (acc / jnp.where(l_i > 0, l_i, 1.0)).astype(o_ref.dtype)


def pick_block(s_total: int, cache_len: int, want: int) -> int:
    """Cache slots per block: the whole cache when it is at most ``want`` slots, else a multiple of 16 of at most
    ``want`` (shorter when ``cache_len`` needs less). The grid then has ``cdiv(cache_len, block)`` blocks."""
    if s_total <= want:
        return s_total
    want = max(_ALIGN, want - want % _ALIGN)
    return min(want, round_up(max(cache_len, 1), _ALIGN))


def pick_query_block(m: int, want: int = 256) -> tuple:
    """(rows per query block, padded rows): one block of the rows rounded up to 8 when they fit ``want``, else
    blocks of ``want`` rows."""
    if m <= want:
        mp = round_up(m, 8)
        return mp, mp
    return want, round_up(m, want)


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None,
                     block_s: int = 512, block_m: int = 256, interpret: bool = False):
    """Same contract as :func:`kernels_pallas.attention.reference.cached_attention`, with a cache (decode,
    verification, chunked prefill)."""
    if k_cache is None:
        raise ValueError("the TPU kernel attends over a cache; a fresh prefill goes to the reference")
    b, t, nh, d = q.shape
    kvh, s_total = k_cache.shape[1], k_cache.shape[2]
    cache_len = cache_len_of(k_cache, attend_len)
    bs = pick_block(s_total, cache_len, block_s)
    nblocks = max(1, pl.cdiv(cache_len, bs))
    bm, mp = pick_query_block((nh // kvh) * t, block_m)
    has_new = k_new is not None
    jp = round_up(k_new.shape[1], 8) if has_new else 0
    pk = pack(q, k_new, v_new, new_mask, kvh, mp, jp)
    lens = jnp.minimum(prefix_len.astype(jnp.int32), cache_len)

    def cache_map(i, h, r, j, lens_ref):
        last = jax.lax.div(jnp.maximum(lens_ref[i] - 1, 0), bs)  # non-negative: no sign() in the lowering
        return i, h, jnp.minimum(j, last), 0

    def rows_map(i, h, r, j, lens_ref):
        return i, h, r, 0

    in_specs = [pl.BlockSpec((None, None, bm, d), rows_map),
                pl.BlockSpec((None, None, bs, d), cache_map),
                pl.BlockSpec((None, None, bs, d), cache_map)]
    operands = [pk.q, k_cache, v_cache]
    if has_new:
        in_specs += [pl.BlockSpec((None, None, jp, d), lambda i, h, r, j, l: (i, h, 0, 0)),
                     pl.BlockSpec((None, None, jp, d), lambda i, h, r, j, l: (i, h, 0, 0)),
                     pl.BlockSpec((None, bm, jp), lambda i, h, r, j, l: (i, r, 0))]
        operands += [pk.k_new, pk.v_new, pk.mask]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, mp // bm, nblocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bm, d), rows_map),
        scratch_shapes=[pltpu.VMEM((bm, 1), jnp.float32), pltpu.VMEM((bm, 1), jnp.float32),
                        pltpu.VMEM((bm, d), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_s=bs, has_new=has_new, precision=dot_precision(q.dtype)),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kvh, mp, d), q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate(q, k_cache, cache_len, k_new.shape[1] if has_new else 0),
        name="cached_attention_tpu",
    )(lens, *operands)
    return unpack(out, q.shape, pk.m)
