"""Dispatch of :func:`cached_attention` to an implementation.

Implementations:

- ``reference``: the jnp reference (``reference.py``); the CPU path.
- ``pallas_gpu`` / ``pallas_tpu``: the Pallas kernels (Triton / Mosaic); they take every call that reads a
  cache: decode (the new token already in the cache), verification and chunked prefill (a cache prefix plus new
  tokens), and read only the valid prefix of each row. A fresh prefill (no cache: attention among the new tokens
  alone) goes to the reference under every implementation.
- ``pallas_gpu_interpret`` / ``pallas_tpu_interpret``: the same kernels run by the Pallas interpreter, on any
  backend (slow; for tests against the reference on CPU).
- ``auto``: the kernel of the platform the program is *lowered* for: ``pallas_gpu`` for CUDA, ``pallas_tpu`` for
  TPU, ``reference`` elsewhere. The choice is staged out with ``jax.lax.platform_dependent``, so a program
  exported or compiled ahead of time on a CPU host for a TPU or GPU contains that platform's kernel.

A kernel is a custom call that XLA cannot partition (Mosaic refuses to, Triton's would be replicated), so under
a mesh (``jax.set_mesh``, or the abstract mesh of ``jax.sharding.use_abstract_mesh``) it runs inside
``jax.shard_map``: rows split over every mesh axis but ``tensor``, heads over ``tensor`` (the layout of the
rollout state's KV caches), each where it divides.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

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
_LOWERING = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}  # lowering platform -> kernel (others: the reference)
HEAD_AXIS = "tensor"  # the mesh axis that splits attention heads; every other axis splits rows


def resolve_impl(impl: str, platform: str = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: JAX's default backend); what ``auto``
    lowers to for that platform.

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
      impl: implementation name (see the module doc); ``auto`` follows the lowering platform.
    Returns:
      [B, T, NH, D] in q's dtype.
    """
    if impl not in NAMES:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {list(NAMES)}")
    if k_cache is None:  # fresh prefill: no cache to skip, the reference under every implementation
        return reference.cached_attention(q, None, None, prefix_len, k_new, v_new, new_mask, attend_len=attend_len)
    args = (q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask)
    if impl == "auto":
        branches = {platform: functools.partial(_partitioned, IMPLEMENTATIONS[name], attend_len=attend_len)
                    for platform, name in _LOWERING.items()}
        return jax.lax.platform_dependent(*args, **branches,
                                          default=functools.partial(reference.cached_attention, attend_len=attend_len))
    name = resolve_impl(impl)
    fn = IMPLEMENTATIONS[name]
    if name == "reference":
        return fn(*args, attend_len=attend_len)
    return _partitioned(fn, *args, attend_len=attend_len)


def _partitioned(fn, q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, *, attend_len):
    """``fn`` (a kernel) per shard of the context mesh, or whole without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k_cache, v_cache, prefix_len, k_new, v_new, new_mask, attend_len=attend_len)
    b, _, nh, _ = q.shape
    kvh = k_cache.shape[1]
    row_axes = tuple(a for a in mesh.axis_names if a != HEAD_AXIS)
    rows = row_axes if row_axes and b % math.prod(mesh.shape[a] for a in row_axes) == 0 else None
    t = mesh.shape.get(HEAD_AXIS, 1)
    heads = HEAD_AXIS if t > 1 and kvh % t == 0 and nh % t == 0 else None
    has_new = k_new is not None
    arrays = (q, k_cache, v_cache, prefix_len) + ((k_new, v_new, new_mask) if has_new else ())
    in_specs = (P(rows, None, heads), P(rows, heads), P(rows, heads), P(rows))
    if has_new:
        in_specs += (P(rows, None, heads), P(rows, None, heads), P(rows))

    def local(*xs):
        extra = xs[4:] if has_new else (None, None, None)
        return fn(*xs[:4], *extra, attend_len=attend_len)

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(rows, None, heads),
                         check_vma=False)(*arrays)
