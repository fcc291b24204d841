"""Flax NNX decoder for the Llama and Qwen2 families, with three forward modes over a dense KV cache.

The module's ``__call__`` is the general forward: T new tokens per row with their own positions and a
T x T mask among them, attending to the row's valid cache prefix. The mode helpers below build the
arguments for prefill, one-token decode and multi-token verification. Everything is a pure function of
(graphdef, state, inputs) once split with ``nnx.split``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.attention import cached_attention
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.kv_cache import KVCache

F32 = jnp.float32


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, P, V] float32 (P = T, or the number of logit_index columns)
    hidden: jax.Array  # [B, T, H] final-norm hidden states
    cache: Optional[KVCache]  # cache with the new tokens written (if write_slots given)
    new_kv: Optional[Tuple[Tuple[jax.Array, jax.Array], ...]]  # per layer ([B,T,KVH,D], [B,T,KVH,D])


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] in float32, with Llama-3 scaling when configured."""
    d = cfg.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    sc = cfg.rope_scaling
    if sc is not None:
        low_wl = sc.original_max_position_embeddings / sc.low_freq_factor
        high_wl = sc.original_max_position_embeddings / sc.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wl, inv / sc.factor, inv)
        smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, half-split convention. x: [B, T, N, D]; positions: [B, T]."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                      rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, h, cfg.num_heads * d, cfg.qkv_bias, rngs)
        self.k_proj = _linear(cfg, h, cfg.num_kv_heads * d, cfg.qkv_bias, rngs)
        self.v_proj = _linear(cfg, h, cfg.num_kv_heads * d, cfg.qkv_bias, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * d, h, False, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.jnp_param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.cfg = cfg

    def project(self, x, positions, inv_freq):
        """Queries, keys and values [B, T, heads, D] of ``x`` [B, T, H]; queries and keys normalised per head
        (Qwen3) and rotated."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(self, x, positions, new_mask, k_cache, v_cache, prefix_len, inv_freq, attend_len, impl,
                 write_slots, read_cache):
        """Returns (output, k_new, v_new, k_cache', v_cache') with the new tokens written if write_slots."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.project(x, positions, inv_freq)
        if write_slots is not None and read_cache and t == 1:
            # Decode: write first, then attend over the cache alone. The cache buffer then has a single
            # user (the in-place scatter) and is never copied; the new slot must be prefix_len (or dropped).
            k_cache, v_cache = write_kv(k_cache, v_cache, k, v, write_slots)
            after = jnp.where(write_slots[:, 0] < k_cache.shape[2], write_slots[:, 0] + 1, prefix_len)
            out = cached_attention(q, k_cache, v_cache, after, None, None, None, attend_len=attend_len, impl=impl)
        else:
            out = cached_attention(q, k_cache if read_cache else None, v_cache if read_cache else None, prefix_len,
                                   k, v, new_mask, attend_len=attend_len, impl=impl)
            if write_slots is not None:
                k_cache, v_cache = write_kv(k_cache, v_cache, k, v, write_slots)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), k, v, k_cache, v_cache


def write_kv(k_cache, v_cache, k, v, slots):
    """Scatters new keys/values [B, T, KVH, D] into [B, KVH, S, D] caches at slots [B, T] (>= S: dropped)."""
    b, t, kvh, _ = k.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(kvh)[None, None, :]
    idx = (rows, heads, slots[:, :, None])  # broadcast to [B, T, KVH]
    k_cache = k_cache.at[idx].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[idx].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, *args):
        a, k, v, kc, vc = self.self_attn(self.input_layernorm(x), *args)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v, kc, vc


class Decoder(nnx.Module):
    """Decoder-only transformer; parameter names follow the Hugging Face layout."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                                      param_dtype=cfg.jnp_param_dtype,
                                      embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head in the compute dtype with (at least) float32 accumulation; returns float32 (float64) logits."""
        if self.cfg.tie_embeddings:
            w = self.embed_tokens.embedding[...].astype(hidden.dtype)
            acc = jnp.promote_types(hidden.dtype, F32)
            return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=acc)
        w = self.lm_head.kernel[...].astype(hidden.dtype)
        acc = jnp.promote_types(hidden.dtype, F32)
        return jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=acc)

    def __call__(self, tokens, positions, new_mask, cache: Optional[KVCache] = None, *, write_slots=None,
                 logit_index=None, attend_len: Optional[int] = None, use_prefix: bool = True,
                 return_new_kv: bool = False, attn_impl: str = "reference", remat: bool = False) -> ForwardOutput:
        """General forward.

        Args:
          tokens: [B, T] int32 new tokens.
          positions: [B, T] int32 positions of the new tokens (RoPE).
          new_mask: [B, T, T] bool mask among the new tokens (each query should see at least itself).
          cache: KVCache or None. Valid slots ``< cache.lengths`` are attended (when ``use_prefix``).
          write_slots: [B, T] int32 cache slots to write the new keys/values to; slots >= S are dropped.
            None writes nothing. ``cache.lengths`` is left unchanged: callers own the lengths.
          logit_index: [B, P] int32 token indices at which to compute logits (None: all T).
          attend_len: static bound on the cache slots read (see ``cached_attention``).
          use_prefix: static; False skips the cache read (fresh prefill).
          return_new_kv: static; also return the new tokens' keys and values per layer.
          remat: static; without a cache, recompute each layer's activations in the backward pass instead of
            keeping them (training memory: one layer's activations instead of all of them).
        """
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg)
        x = self.embed(tokens)
        read_cache = cache is not None and use_prefix
        prefix_len = cache.lengths if cache is not None else None
        if cache is None:
            write_slots = None
        new_k, new_v, kvs = [], [], []
        if remat and cache is None and not return_new_kv:
            def block(layer, x, positions, new_mask, inv_freq):
                return layer(x, positions, new_mask, None, None, None, inv_freq, attend_len, attn_impl, None,
                             False)[0]

            block = nnx.remat(block)
            for layer in self.layers:
                x = block(layer, x, positions, new_mask, inv_freq)
            hidden = self.norm(x)
            h_sel = hidden if logit_index is None else jnp.take_along_axis(hidden, logit_index[..., None], axis=1)
            return ForwardOutput(self.logits(h_sel), hidden, None, None)
        for i, layer in enumerate(self.layers):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            x, k, v, kc, vc = layer(x, positions, new_mask, kc, vc, prefix_len, inv_freq, attend_len, attn_impl,
                                    write_slots, read_cache)
            if return_new_kv:
                kvs.append((k, v))
            new_k.append(kc)
            new_v.append(vc)
        hidden = self.norm(x)
        h_sel = hidden if logit_index is None else jnp.take_along_axis(hidden, logit_index[..., None], axis=1)
        logits = self.logits(h_sel)
        out_cache = cache
        if write_slots is not None:
            out_cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        return ForwardOutput(logits, hidden, out_cache, tuple(kvs) if return_new_kv else None)


# ---------------------------------------------------------------------------------------------------------
# Mode helpers: build positions / masks / write slots for the three modes.


def causal_mask(t: int) -> jax.Array:
    """[T, T] bool: position i sees positions j <= i."""
    return jnp.tril(jnp.ones((t, t), bool))


def padded_causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T, T] bool for a padded batch (``valid`` [B, T]): causal among valid tokens; every position sees
    itself (so a padding row's softmax stays finite)."""
    t = valid.shape[1]
    return causal_mask(t)[None] & (valid[:, None, :] | jnp.eye(t, dtype=bool)[None])


def abstract_model(cfg: ModelConfig) -> "Decoder":
    """The Decoder of ``cfg`` with shape-only parameters (no memory allocated).

    Built one layer per trace: tracing the whole model at once costs time quadratic in its depth (each
    variable write inspects the trace so far), 27 s for an 80-layer model on 8 devices against 1 s this way.
    """
    model = nnx.eval_shape(lambda: Decoder(cfg.replace(num_layers=1), rngs=nnx.Rngs(0)))  # a shell
    model.cfg = cfg
    model.layers = nnx.List([nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))) for _ in range(cfg.num_layers)])
    return model


def prefill(model: Decoder, tokens: jax.Array, valid: jax.Array, cache: KVCache, *, all_logits: bool = False,
            use_prefix: bool = True, attend_len: Optional[int] = None, attn_impl: str = "reference"):
    """Prefill a left- or right-padded prompt batch, appending after each row's current cache length.

    Args:
      tokens: [B, T] int32, padded anywhere (left or right); ``valid`` marks real tokens.
      valid: [B, T] bool.
      cache: KVCache; new tokens go to slots ``lengths + (rank among valid tokens)``.
      all_logits: return logits for all T tokens; otherwise only at each row's last valid token ([B, 1, V]).
      use_prefix: static; False when the cache is known to be empty (skips reading it).
    Returns:
      (logits, hidden [B, T, H], cache with lengths advanced by the number of valid tokens).
    """
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, valid])
    chex.assert_shape(cache.lengths, (tokens.shape[0],))
    b, t = tokens.shape
    valid = valid.astype(bool)
    rank = jnp.cumsum(valid, axis=1) - 1  # index among valid tokens
    positions = cache.lengths[:, None] + jnp.maximum(rank, 0)
    mask = padded_causal_mask(valid)
    slots = jnp.where(valid, positions, cache.max_len)
    n_valid = valid.sum(axis=1).astype(jnp.int32)
    last = jnp.argmax(jnp.where(valid, jnp.arange(t)[None, :], -1), axis=1)[:, None]
    out = model(tokens, positions.astype(jnp.int32), mask, cache, write_slots=slots.astype(jnp.int32),
                logit_index=None if all_logits else last, attend_len=attend_len, use_prefix=use_prefix,
                attn_impl=attn_impl)
    new_cache = out.cache.replace(lengths=cache.lengths + n_valid)
    return out.logits, out.hidden, new_cache


def decode(model: Decoder, token: jax.Array, cache: KVCache, active: Optional[jax.Array] = None, *,
           attend_len: Optional[int] = None, attn_impl: str = "reference"):
    """One-token decode. token: [B]; active: [B] bool (inactive rows write nothing and keep their length).

    Returns (logits [B, V], hidden [B, H], cache).
    """
    chex.assert_shape(token, (cache.batch,))
    b = token.shape[0]
    if active is None:
        active = jnp.ones((b,), bool)
    pos = cache.lengths[:, None]
    slots = jnp.where(active[:, None], pos, cache.max_len)
    out = model(token[:, None], pos, jnp.ones((b, 1, 1), bool), cache, write_slots=slots, attend_len=attend_len,
                attn_impl=attn_impl)
    new_cache = out.cache.replace(lengths=cache.lengths + active.astype(jnp.int32))
    return out.logits[:, 0], out.hidden[:, 0], new_cache


def verify(model: Decoder, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache, *,
           attend_len: Optional[int] = None, attn_impl: str = "reference"):
    """Score V new tokens per row (a chain or a tree) against the cache without writing to it.

    Args:
      tokens: [B, V] int32; positions: [B, V] int32 (e.g. lengths + depth in the tree);
      mask: [B, V, V] bool, ``mask[b, i, j]``: node i sees node j (ancestors and itself).
    Returns:
      (logits [B, V, Vocab], hidden [B, V, H], new_kv: per layer (k, v) each [B, V, KVH, D]).
    """
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, positions])
    chex.assert_shape(mask, tokens.shape + tokens.shape[1:])
    chex.assert_shape(cache.lengths, tokens.shape[:1])
    out = model(tokens, positions, mask, cache, write_slots=None, attend_len=attend_len, return_new_kv=True,
                attn_impl=attn_impl)
    return out.logits, out.hidden, out.new_kv
