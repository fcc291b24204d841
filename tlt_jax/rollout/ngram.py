"""Model-free n-gram proposer: continue the most recent earlier occurrence of the last n tokens.

The fallback drafter before a learned one is warm. It looks up the last ``n`` tokens (n from ``max_n`` down
to ``min_n``) in the row's own history (prompt and answer so far) and proposes the ``depth`` tokens that
followed the most recent earlier match, as a chain. Without a match it proposes the root token repeated
(any proposal is safe: the target decides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def propose_ngram(history: jax.Array, length: jax.Array, depth: int, max_n: int = 3, min_n: int = 1) -> jax.Array:
    """Draft chain [B, depth] int32.

    Args:
      history: [B, S] int32 tokens by position; positions ``< length`` are valid.
      length: [B] int32 valid history length (the last valid token is the root, at ``length - 1``).
    """
    b, s = history.shape
    last = length - 1
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # candidate end positions i of an earlier occurrence
    best = jnp.full((b,), -1, jnp.int32)
    for n in range(max_n, min_n - 1, -1):
        eq = (pos >= n - 1) & (pos < last[:, None])
        for j in range(n):
            key_tok = jnp.take_along_axis(history, jnp.maximum(last - j, 0)[:, None], axis=1)  # [B, 1]
            shifted = jnp.roll(history, j, axis=1)  # shifted[:, i] = history[:, i - j]
            eq = eq & (shifted == key_tok)
        eq = eq & (last[:, None] - (n - 1) >= 0)
        found = jnp.max(jnp.where(eq, pos, -1), axis=1)
        best = jnp.where(best >= 0, best, found)
    idx = best[:, None] + 1 + jnp.arange(depth, dtype=jnp.int32)[None, :]
    root = jnp.take_along_axis(history, jnp.maximum(last, 0)[:, None], axis=1)
    cont = jnp.take_along_axis(history, jnp.clip(idx, 0, s - 1), axis=1)
    ok = (best[:, None] >= 0) & (idx <= last[:, None])
    return jnp.where(ok, cont, root).astype(jnp.int32)
