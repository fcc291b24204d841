"""Dispatch of :func:`cached_attention` to an implementation."""

from __future__ import annotations

from kernels_pallas.attention import reference

IMPLEMENTATIONS = {"reference": reference.cached_attention}


def cached_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len=None,
                     impl: str = "reference"):
    """Attention over ``cache[:, :prefix_len]`` plus the new tokens.

    Args:
      q: [B, T, NH, D] queries, already rotated; NH a multiple of KVH (grouped-query attention).
      k_cache, v_cache: [B, KVH, S, D] cache, or None when there is no prefix (fresh prefill).
      prefix_len: [B] int32, number of valid cache slots of each row (slot s holds position s).
      k_new, v_new: [B, T, KVH, D] keys and values of the new tokens, or None when they were already
        written to the cache (one-token decode: ``prefix_len`` then counts the new token).
      new_mask: [B, T, T] bool, ``new_mask[b, i, j]``: query i may attend to new token j.
      attend_len: static int <= S; only the first ``attend_len`` cache slots are read (all rows
        must have ``prefix_len <= attend_len``). None reads the whole cache.
      impl: implementation name (see IMPLEMENTATIONS).
    Returns:
      [B, T, NH, D] in q's dtype.
    """
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {sorted(IMPLEMENTATIONS)}")
    return fn(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len=attend_len)
