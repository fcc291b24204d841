"""The one-layer EAGLE drafter: concat(token embedding, target feature) -> fc -> one decoder layer.

The drafter owns only its ``fc`` projection and one decoder layer of the target's shape (no input norm, no
final norm). Token embedding and LM head are the policy's: every call takes the target ``Decoder`` and reads
its parameters, so there is no second copy in memory, and drafter checkpoints never contain them.

Optionally the drafter proposes from a *draft vocabulary*: a fixed subset of token ids (the most frequent
ones in its warm-up data). Its logits are then the policy's LM head restricted to those rows, which makes a
draft step several times cheaper at large vocabularies; acceptance is always decided by the target, so the
rollout stays exact whatever the drafter proposes.

Sequence convention: the drafter's input at position t is the pair (f_t, x_{t+1}) -- the target's final
hidden state at token t and the next token -- and its output at t estimates f_{t+1}.
"""

from __future__ import annotations

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.attention import cached_attention
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import MLP, Attention, Decoder, RMSNorm, rope_inv_freq, write_kv
from tlt_jax.models.kv_cache import KVCache, init_cache

F32 = jnp.float32


class VocabIds(nnx.Variable):
    """Token ids of the draft vocabulary (data, not trained)."""


class DrafterLayer(nnx.Module):
    """A decoder layer of the target's shape without the input norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)


class Drafter(nnx.Module):
    """EAGLE drafter for a target of config ``cfg``.

    Args:
      cfg: the *target's* ModelConfig (the drafter layer has its shape).
      draft_vocab: optional int array of token ids the drafter proposes from (None: the full vocabulary).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, draft_vocab: Optional[np.ndarray] = None):
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nnx.Linear(2 * h, h, use_bias=True, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                             rngs=rngs)
        # Start with the feature half passing through (x = f_t + W_e e_{t+1}): the layer then begins as a
        # residual update of the target's feature, which trains faster than a random projection.
        kernel = self.fc.kernel[...]
        self.fc.kernel[...] = kernel.at[h:].set(jnp.eye(h, dtype=kernel.dtype))
        self.layer = DrafterLayer(cfg, rngs)
        if draft_vocab is None:
            self.vocab_ids = None
        else:
            ids = np.asarray(draft_vocab, np.int32)
            if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= cfg.vocab_size:
                raise ValueError(f"draft vocabulary must be a non-empty 1-D array of ids in [0, {cfg.vocab_size})")
            self.vocab_ids = VocabIds(jnp.asarray(ids))

    @property
    def draft_vocab_size(self) -> int:
        return self.cfg.vocab_size if self.vocab_ids is None else int(self.vocab_ids[...].shape[0])

    # ------------------------------------------------------------------------------------------ head

    def head_weight(self, target: Decoder, full: bool = False) -> jax.Array:
        """[N, H] rows of the policy's LM head the drafter proposes from (N = draft vocabulary size; ``full``:
        every row, N = the target's vocabulary).

        With a draft vocabulary this is a gather (a temporary; compute it once per chunk and pass it to
        :meth:`logits`); without one it is the policy's own weight, transposed lazily by XLA.
        """
        if target.cfg.tie_embeddings:
            w = target.embed_tokens.embedding[...]
        else:
            w = target.lm_head.kernel[...].T
        if self.vocab_ids is not None and not full:
            w = jnp.take(w, self.vocab_ids[...], axis=0)
        return w

    def logits(self, hidden: jax.Array, head_w: jax.Array) -> jax.Array:
        """Draft logits over the draft vocabulary, float32: [..., N]."""
        return jnp.einsum("...h,nh->...n", hidden, head_w.astype(hidden.dtype),
                          preferred_element_type=jnp.promote_types(hidden.dtype, F32))

    def full_vocab_logits(self, draft_logits: jax.Array) -> jax.Array:
        """Draft logits [..., N] scattered over the target's vocabulary [..., vocab_size] (-inf off the draft
        vocabulary): the drafter's distribution over every token, as the sampled acceptance rule needs it."""
        if self.vocab_ids is None:
            return draft_logits
        full = jnp.full(draft_logits.shape[:-1] + (self.cfg.vocab_size,), -jnp.inf, draft_logits.dtype)
        return full.at[..., self.vocab_ids[...]].set(draft_logits)

    def to_token_ids(self, draft_index: jax.Array) -> jax.Array:
        """Maps indices into the draft vocabulary to token ids."""
        if self.vocab_ids is None:
            return draft_index.astype(jnp.int32)
        return jnp.take(self.vocab_ids[...], draft_index, axis=0).astype(jnp.int32)

    # ------------------------------------------------------------------------------------------ forward

    def __call__(self, target: Decoder, tokens: jax.Array, feats: jax.Array, positions: jax.Array,
                 mask: jax.Array, cache: Optional[KVCache] = None, *, write_slots: Optional[jax.Array] = None,
                 extra_kv: Optional[Tuple[jax.Array, jax.Array]] = None, read_cache: bool = True,
                 attn_impl: str = "reference") -> Tuple[jax.Array, Tuple[jax.Array, jax.Array], Optional[KVCache]]:
        """One drafter forward.

        Args:
          target: the policy (its embedding is read).
          tokens: [B, T] int32 tokens x_{t+1}; feats: [B, T, H] features f_t (target or drafter hidden).
          positions: [B, T] int32.
          mask: [B, T, J + T] bool over (extra keys, then the T new tokens); J = 0 without ``extra_kv``.
          cache: the drafter's one-layer KVCache (prefix ``< lengths`` attended) or None.
          write_slots: [B, T] slots to write the new keys/values to (>= S dropped); None writes nothing.
          extra_kv: optional (k, v) [B, J, KVH, D] of earlier tree nodes, attended under ``mask``.
          read_cache: False when the cache is known to be empty (the prompt pass): its keys are only written.
          attn_impl: the attention implementation of the cached attention (``kernels_pallas.attention``).
        Returns:
          (hidden [B, T, H] (estimates of f_{t+1}), (k, v) [B, T, KVH, D] of the new tokens, cache').
        """
        cfg = self.cfg
        b, t = tokens.shape
        chex.assert_shape(feats, (b, t, cfg.hidden_size))
        chex.assert_shape(positions, (b, t))
        extra = 0 if extra_kv is None else extra_kv[0].shape[1]
        chex.assert_shape(mask, (b, t, extra + t))
        x = jnp.concatenate([target.embed(tokens).astype(cfg.jnp_dtype), feats.astype(cfg.jnp_dtype)], axis=-1)
        x = self.fc(x)
        attn = self.layer.self_attn
        q, k, v = attn.project(x, positions, rope_inv_freq(cfg))
        keys, vals = k, v
        if extra_kv is not None:
            keys = jnp.concatenate([extra_kv[0].astype(k.dtype), k], axis=1)
            vals = jnp.concatenate([extra_kv[1].astype(v.dtype), v], axis=1)
        kc = cache.k[0] if cache is not None else None
        vc = cache.v[0] if cache is not None else None
        attend = cache is not None and read_cache
        out = cached_attention(q, kc if attend else None, vc if attend else None,
                               cache.lengths if attend else None, keys, vals, mask, impl=attn_impl)
        x = x + attn.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim))
        hidden = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
        new_cache = cache
        if cache is not None and write_slots is not None:
            kc, vc = write_kv(kc, vc, k, v, write_slots)
            new_cache = cache.replace(k=(kc,), v=(vc,))
        return hidden, (k, v), new_cache


def init_drafter_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """The drafter's own one-layer cache (same slot convention as the target's)."""
    return init_cache(cfg.replace(num_layers=1), batch, max_len)
