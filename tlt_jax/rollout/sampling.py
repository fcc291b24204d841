"""Sampling distributions: greedy, temperature, top-k and top-p, with exact (sort-free) top-p.

``SamplingParams`` is static (hashable): each setting is one compiled program. The same
``sampling_logprobs`` defines the distribution for plain decoding and, later, for lossless verification.

Rollouts draw the token at answer position t of a row from the uniform u(row, t) (:func:`position_uniforms`
of the row's key, :func:`row_keys`): the same seed then gives the same answers whatever the batch layout
(replicas, compaction, mesh), and speculation under the target-only rule commits at each position the token
plain decoding draws there -- token-identical answers at any temperature, up to floating-point differences
between the programs' logits.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from tlt_jax.core.errors import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means off; top_p 1.0 means off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be a non-negative integer, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _top_p_threshold(probs: jax.Array, top_p: float) -> jax.Array:
    """Largest probability value tau with sum(probs[probs >= tau]) >= top_p, per row ([..., 1]).

    Bisection over the bit patterns of non-negative float32 values (monotone as integers), so the
    threshold is exact among representable values and no sort over the vocabulary is needed.
    """
    probs = probs.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # mass(0) = 1 >= top_p
    hi = bits.max(axis=-1, keepdims=True) + 1  # mass(> max) = 0 < top_p

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        mass = jnp.where(bits >= mid, probs, 0.0).sum(-1, keepdims=True)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def sampling_logprobs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probabilities of the distribution tokens are drawn from. logits: [..., V] -> [..., V].

    Greedy (temperature 0) returns the model's own log-softmax (the argmax is taken from it).
    Removed tokens get -inf.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays float64
    if params.greedy:
        return jax.nn.log_softmax(logits, axis=-1)
    x = logits / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, NEG_INF)
    if params.top_p < 1.0:
        probs = jax.nn.softmax(x, axis=-1)
        tau = _top_p_threshold(probs, params.top_p)
        x = jnp.where(probs >= tau, x, NEG_INF)
    return jax.nn.log_softmax(x, axis=-1)


def row_keys(key: jax.Array, batch: int, rows: Optional[jax.Array] = None) -> jax.Array:
    """[B, 2] one key per rollout row, from the rollout's ``key`` and each row's index ``rows`` [B] in the whole
    batch (None: 0 .. batch - 1); a stream of ``key`` apart from :func:`other_draws`."""
    rows = jnp.arange(batch) if rows is None else rows
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, 0), rows.astype(jnp.uint32))


def other_draws(key: jax.Array) -> jax.Array:
    """The rollout's key for its draws that are not the target's tokens (independent of :func:`row_keys`)."""
    return jax.random.fold_in(key, 1)


def position_uniforms(keys: jax.Array, index: jax.Array) -> jax.Array:
    """The uniform of answer position ``index`` ([B] or [B, W]) of each row of ``keys`` [B, 2]: u(row, t) is
    ``uniform(fold_in(row key, t))``, so it depends on the row and the position only -- not on the batch layout,
    the step the token is drawn in, or how many tokens that step commits."""
    def one(k, i):
        return jax.random.uniform(jax.random.fold_in(k, i.astype(jnp.uint32)), (), jnp.float32)

    if index.ndim == 1:
        return jax.vmap(one)(keys, index)
    return jax.vmap(jax.vmap(one, (None, 0)))(keys, index)


def inverse_cdf(key: Optional[jax.Array], logp: jax.Array, u: Optional[jax.Array] = None) -> jax.Array:
    """One draw per row from exp(logp) ([..., V] -> [...]) by inverting the cumulative distribution.

    Token i is drawn iff c[i-1] <= u < c[i] with u uniform on [0, c[V-1]): exactly the distribution, with one
    random number per row instead of V Gumbel variates (several times cheaper at 50k-token vocabularies).
    Tokens of probability 0 (removed by top-k/top-p) are never drawn. ``u`` [...]: the rows' uniforms on [0, 1)
    (e.g. :func:`position_uniforms`); None draws them from ``key``.
    """
    p = jnp.exp(logp)
    c = jnp.cumsum(p, axis=-1)
    if u is None:
        u = jax.random.uniform(key, logp.shape[:-1], dtype=c.dtype)
    u = u.astype(c.dtype)[..., None] * c[..., -1:]
    idx = jnp.sum(c <= u, axis=-1)  # c[idx] > u >= c[idx - 1], so p[idx] > 0
    # u rounding up to the total: take the last token of positive probability
    last = logp.shape[-1] - 1 - jnp.argmax(jnp.flip(p > 0, axis=-1), axis=-1)
    return jnp.where(idx >= logp.shape[-1], last, idx)


def sample(key: Optional[jax.Array], logits: jax.Array, params: SamplingParams,
           u: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Draws one token per row. logits: [B, V]; ``u`` [B]: the rows' uniforms (None: drawn from ``key``).
    Returns (tokens [B] int32, log-prob of each token [B])."""
    logp = sampling_logprobs(logits, params)
    if params.greedy:
        tokens = jnp.argmax(logp, axis=-1)
    else:
        tokens = inverse_cdf(key, logp, u)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def sample_at(keys: jax.Array, index: jax.Array, logits: jax.Array, params: SamplingParams
              ) -> Tuple[jax.Array, jax.Array]:
    """:func:`sample` of each row's token at answer position ``index`` [B], with the rows' position uniforms
    (``keys`` [B, 2], :func:`row_keys`)."""
    return sample(None, logits, params, None if params.greedy else position_uniforms(keys, index))
