"""Attention of new query tokens against a dense KV cache prefix plus the new tokens under a mask.

One API, :func:`cached_attention`, used by prefill (T prompt tokens, empty or partial prefix), decode
(T = 1) and verification (T = V draft tokens under an arbitrary V x V mask).
"""

from kernels_pallas.attention.api import IMPLEMENTATIONS, NAMES, cached_attention, resolve_impl

__all__ = ["cached_attention", "resolve_impl", "IMPLEMENTATIONS", "NAMES"]
