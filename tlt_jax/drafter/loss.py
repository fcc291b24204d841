"""The EAGLE drafter loss: feature regression plus soft cross-entropy against the target's next token.

For a sequence x_0..x_{L-1} with target features f_0..f_{L-1} (final-norm hidden states), the drafter reads
the pairs (f_t, x_{t+1}) for t < L - 1 with causal attention (teacher forcing) and its output at t estimates
f_{t+1}. Loss per position: smooth-L1(f_hat, f_{t+1}) (mean over H) + 0.1 x cross-entropy between the target's
distribution softmax(head(f_{t+1})) and the drafter's softmax(head(f_hat)), both over the draft vocabulary;
averaged over the positions ``loss_mask`` selects (response tokens).

Packed rows: with ``segments`` (0 = padding, k > 0 = the k-th sequence in the row) several sequences share a
row. Attention is then causal *and* within a segment, RoPE positions restart at 0 at each segment start, and
the pair (f_t, x_{t+1}) only counts when t and t + 1 lie in the same (non-padding) segment, so the loss of a
packed row is the token-weighted mean of its sequences' losses computed one by one.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from tlt_jax.models.decoder import Decoder, causal_mask, padded_causal_mask
from tlt_jax.models.drafter import Drafter

REG_WEIGHT = 1.0
CE_WEIGHT = 0.1


def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def target_features(model: Decoder, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, L, H] of right-padded sequences (one causal forward, no cache)."""
    b, l = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None], (b, l))
    mask = padded_causal_mask(valid)
    return model(tokens, positions, mask, None, logit_index=jnp.zeros((b, 1), jnp.int32)).hidden


def segment_positions(segments: jax.Array) -> jax.Array:
    """[B, T] int32 position of each token within its segment (0 at each segment start; padding included)."""
    b, t = segments.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    start = jnp.concatenate([jnp.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - first


def drafter_loss(drafter: Drafter, target: Decoder, tokens: jax.Array, feats: jax.Array, loss_mask: jax.Array,
                 head_w: jax.Array, noise_key: jax.Array = None, noise: float = 0.0,
                 segments: Optional[jax.Array] = None, temperature: float = 0.0, dist_weight: float = 0.0
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Mean EAGLE loss and metrics.

    With ``temperature`` > 0 a distribution term at the rollout's temperature is added, ``dist_weight`` x
    KL(p_T || q_T) between the target's and the drafter's next-token distributions softmax(logits / T) over the
    draft vocabulary (what the sampled acceptance rule rewards: it accepts with probability 1 - TV(p, q)); the
    metrics then carry ``tv`` = TV(p_T, q_T) over the draft vocabulary.

    Args:
      tokens: [B, L] int32 (right padded); feats: [B, L, H] target features of those tokens.
      loss_mask: [B, L] bool; position t counts when f_t is to be predicted (t >= 1).
      head_w: ``drafter.head_weight(target)`` (the draft vocabulary's rows of the LM head).
      noise_key, noise: uniform noise in [-noise, noise] added to the *input* features (not the targets), so
        the drafter learns to continue from its own imperfect features at draft time.
      segments: optional [B, L] int32 for packed rows (0 = padding, k > 0 = the k-th sequence of the row):
        attention stays within a segment, positions restart per segment, and pairs across segments or in the
        padding never count. None: one sequence per row (right padded), as before.
    """
    b, l = tokens.shape
    chex.assert_shape(feats, (b, l, drafter.cfg.hidden_size))
    chex.assert_shape(loss_mask, (b, l))
    t = l - 1
    m = loss_mask[:, 1:]
    if segments is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        causal = jnp.broadcast_to(causal_mask(t)[None], (b, t, t))
    else:
        chex.assert_shape(segments, (b, l))
        # Input t is the pair (f_t, x_{t+1}); it belongs to f_t's segment. The one pair that straddles a boundary
        # (last token of a sequence, first of the next) is only attended by itself and never counts.
        seg = segments[:, :-1]
        positions = segment_positions(seg)
        causal = causal_mask(t)[None] & (seg[:, :, None] == seg[:, None, :])
        m = m & (seg == segments[:, 1:]) & (segments[:, 1:] != 0)
    inp = feats[:, :-1]
    if noise and noise_key is not None:
        inp = inp + jax.random.uniform(noise_key, inp.shape, inp.dtype, -noise, noise)
    pred, _, _ = drafter(target, tokens[:, 1:], inp, positions, causal)
    pred = pred.astype(jnp.float32)
    tgt = jax.lax.stop_gradient(feats[:, 1:].astype(jnp.float32))
    m = m.astype(jnp.float32)
    reg = smooth_l1(pred - tgt).mean(-1)
    w = jax.lax.stop_gradient(head_w)
    p = jax.nn.softmax(drafter.logits(tgt, w), axis=-1)
    logq = jax.nn.log_softmax(drafter.logits(pred, w), axis=-1)
    ce = -(p * logq).sum(-1)
    denom = jnp.maximum(m.sum(), 1.0)
    per_token = REG_WEIGHT * reg + CE_WEIGHT * ce
    top1 = (jnp.argmax(logq, -1) == jnp.argmax(p, -1)).astype(jnp.float32)
    metrics = {"reg": (reg * m).sum() / denom, "ce": (ce * m).sum() / denom, "top1": (top1 * m).sum() / denom,
               "tokens": m.sum()}
    if temperature > 0:
        logp_t = jax.nn.log_softmax(drafter.logits(tgt, w) / temperature, axis=-1)
        logq_t = jax.nn.log_softmax(drafter.logits(pred, w) / temperature, axis=-1)
        kl = (jnp.exp(logp_t) * (logp_t - logq_t)).sum(-1)
        tv = 0.5 * jnp.abs(jnp.exp(logp_t) - jnp.exp(logq_t)).sum(-1)
        per_token = per_token + dist_weight * kl
        metrics.update(kl=(kl * m).sum() / denom, tv=(tv * m).sum() / denom)
    loss = (per_token * m).sum() / denom
    metrics["loss"] = loss
    return loss, metrics


def distribution_overlap(drafter: Drafter, target: Decoder, tokens: jax.Array, feats: jax.Array,
                         loss_mask: jax.Array, temperature: float) -> jax.Array:
    """Mean over the ``loss_mask`` positions of 1 - TV(p_T, q_T) = sum_x min(p_T(x), q_T(x)), teacher forced:
    the target's next-token distribution at temperature T over its whole vocabulary against the drafter's (zero
    off the draft vocabulary). The sampled rule accepts a drafted token with this probability."""
    b, l = tokens.shape
    t = l - 1
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    pred, _, _ = drafter(target, tokens[:, 1:], feats[:, :-1], positions,
                         jnp.broadcast_to(causal_mask(t)[None], (b, t, t)))
    full_w = drafter.head_weight(target, full=True)
    logp = jax.nn.log_softmax(drafter.logits(feats[:, 1:], full_w) / temperature, axis=-1)
    logq = jax.nn.log_softmax(drafter.full_vocab_logits(drafter.logits(pred, drafter.head_weight(target)))
                              / temperature, axis=-1)
    overlap = jnp.minimum(jnp.exp(logp), jnp.exp(logq)).sum(-1)
    m = loss_mask[:, 1:].astype(jnp.float32)
    return (overlap * m).sum() / jnp.maximum(m.sum(), 1.0)
