"""Dispatch of :func:`cached_attention` to an implementation.

Implementations:

- ``reference``: the jnp reference (``reference.py``); the CPU path, and the path for fresh prefill.
- ``pallas_gpu`` / ``pallas_tpu``: the Pallas kernels (Triton / Mosaic); they take calls with a cache prefix
  and new tokens (verification, chunked prefill) and hand the other calls to the reference.
- ``pallas_gpu_interpret`` / ``pallas_tpu_interpret``: the same kernels run by the Pallas interpreter, on any
  backend (slow; for tests against the reference on CPU).
- ``auto``: ``pallas_gpu`` on GPU, ``pallas_tpu`` on TPU, ``reference`` elsewhere (see :func:`resolve_impl`).
"""

from __future__ import annotations

import functools

import jax

from kernels_pallas.attention import reference


def _pallas_gpu(*args, interpret=False, **kw):
    from kernels_pallas.attention import pallas_gpu  # local: a backend loads only when chosen (Pallas, ~0.4 s)

    return pallas_gpu.cached_attention(*args, interpret=interpret, **kw)


def _pallas_tpu(*args, interpret=False, **kw):
    from kernels_pallas.attention import pallas_tpu  # local: a backend loads only when chosen (Pallas, ~0.4 s)

    return pallas_tpu.cached_attention(*args, interpret=interpret, **kw)


IMPLEMENTATIONS = {
    "reference": reference.cached_attention,
    "pallas_gpu": _pallas_gpu,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu_interpret": functools.partial(_pallas_gpu, interpret=True),
    "pallas_tpu_interpret": functools.partial(_pallas_tpu, interpret=True),
}
NAMES = ("auto",) + tuple(IMPLEMENTATIONS)
_NATIVE = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_impl(impl: str, platform: str = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: JAX's default backend).

    ``auto`` picks the platform's kernel; asking for a compiled kernel on a platform it cannot run on is an
    error (the interpreted variants run anywhere).
    """
    if impl not in NAMES:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {list(NAMES)}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        return _NATIVE.get(platform, "reference")
    if impl in _NATIVE.values() and _NATIVE.get(platform) != impl:
        raise ValueError(f"attention implementation {impl!r} needs a {impl.split('_')[1].upper()} backend; "
                         f"this one is {platform!r} (use 'auto', 'reference' or '{impl}_interpret')")
    return impl


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
      impl: implementation name (see the module doc); ``auto`` is resolved for the default backend.
    Returns:
      [B, T, NH, D] in q's dtype.
    """
    fn = IMPLEMENTATIONS[resolve_impl(impl)]
    return fn(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len=attend_len)
