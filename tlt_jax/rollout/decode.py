"""Plain (non-speculative) rollout programs: a prefill and a chunk of K decode steps, and what every rollout
shares (the static spec, the finish reasons, prompt padding and checks).

The rollout state is one pytree with static shapes. A chunk is a ``lax.while_loop`` of at most K decode
steps that stops early once every row is done; finished rows are frozen by their ``done`` flag (they write
nothing). The host regains control between chunks and reads only the done flags (``rollout.host``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.core.errors import InputError
from tlt_jax.core.shapes import default_cache_len, round_up
from tlt_jax.models.decoder import Decoder, decode, prefill
from tlt_jax.models.kv_cache import KVCache, init_cache
from tlt_jax.rollout.sampling import SamplingParams, row_keys, sample_at

FINISH_RUNNING = 0
FINISH_STOP = 1  # an EOS / stop token was produced (and is included in the answer)
FINISH_LENGTH = 2  # max new tokens reached
FINISH_CACHE = 3  # the KV cache is full
FINISH_NAMES = {FINISH_RUNNING: "running", FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_CACHE: "cache"}


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Static settings of a rollout program (hashable)."""

    max_new_tokens: int = 128
    stop_tokens: Tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()
    chunk_steps: int = 16
    attn_impl: str = "reference"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.chunk_steps < 1:
            raise InputError(f"chunk_steps must be >= 1, got {self.chunk_steps}")


@flax.struct.dataclass
class RolloutState:
    cache: KVCache
    next_token: jax.Array  # [B] int32, last sampled token (fed to the next decode step)
    tokens: jax.Array  # [B, N] int32 generated tokens
    logprobs: jax.Array  # [B, N] float32 log-prob of each token under the sampling distribution
    num_tokens: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 finish reason
    max_new: jax.Array  # [B] int32 per-row limit (<= N)
    row_keys: jax.Array  # [B, 2] each row's key: the token at answer position t is drawn with u(row, t)


def is_stop_token(tok: jax.Array, spec: RolloutSpec) -> jax.Array:
    """Bool array shaped like ``tok``: which tokens are stop tokens of ``spec``."""
    if not spec.stop_tokens:
        return jnp.zeros(tok.shape, bool)
    return jnp.isin(tok, jnp.asarray(spec.stop_tokens, jnp.int32))


def finish_reason(stopped: jax.Array, at_limit: jax.Array, cache_full: jax.Array) -> jax.Array:
    """[B] int32 finish reason, in order of precedence: a stop token, the row's length limit, a full cache."""
    return jnp.where(stopped, FINISH_STOP, jnp.where(at_limit, FINISH_LENGTH, jnp.where(
        cache_full, FINISH_CACHE, FINISH_RUNNING))).astype(jnp.int32)


def _record(state_fields, tok, lp, active, spec: RolloutSpec, cache_len_now, cache_size):
    """Appends the sampled token of active rows and updates done / finish."""
    tokens, logprobs, num, done, finish, max_new = state_fields
    b, n = tokens.shape
    rows = jnp.arange(b)
    col = jnp.where(active, num, n)
    tokens = tokens.at[rows, col].set(tok, mode="drop")
    logprobs = logprobs.at[rows, col].set(lp.astype(logprobs.dtype), mode="drop")
    num = num + active.astype(jnp.int32)
    reason = finish_reason(is_stop_token(tok, spec), num >= max_new, cache_len_now >= cache_size)
    newly = active & (reason != FINISH_RUNNING)
    finish = jnp.where(newly, reason, finish)
    done = done | newly
    return tokens, logprobs, num, done, finish


def rollout_start(params, prompt_tokens, prompt_valid, max_new, rng, row_ids=None, *, graphdef,
                  spec: RolloutSpec, cache_len: int) -> RolloutState:
    """Prefill the prompts into a fresh cache and sample each row's first token.

    prompt_tokens / prompt_valid: [B, P] (left or right padded); max_new: [B] int32; ``row_ids`` [B]: each
    row's index in the whole batch, which with ``rng`` makes its key (``sampling.row_keys``; None: 0 .. B - 1).
    """
    model: Decoder = nnx.merge(graphdef, params)
    b = prompt_tokens.shape[0]
    cache = init_cache(model.cfg, b, cache_len)
    logits, _, cache = prefill(model, prompt_tokens, prompt_valid, cache, use_prefix=False,
                               attn_impl=spec.attn_impl)
    keys = row_keys(rng, b, row_ids)
    tok, lp = sample_at(keys, jnp.zeros((b,), jnp.int32), logits[:, 0], spec.sampling)
    n = spec.max_new_tokens
    fields = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), jnp.int32),
              jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), max_new)
    tokens, logprobs, num, done, finish = _record(fields, tok, lp, jnp.ones((b,), bool), spec, cache.lengths,
                                                  cache_len)
    return RolloutState(cache=cache, next_token=tok, tokens=tokens, logprobs=logprobs, num_tokens=num, done=done,
                        finish=finish, max_new=max_new, row_keys=keys)


def decode_step(model: Decoder, st: RolloutState, spec: RolloutSpec) -> RolloutState:
    active = ~st.done
    logits, _, cache = decode(model, st.next_token, st.cache, active, attn_impl=spec.attn_impl)
    tok, lp = sample_at(st.row_keys, st.num_tokens, logits, spec.sampling)
    tok = jnp.where(active, tok, st.next_token)
    fields = (st.tokens, st.logprobs, st.num_tokens, st.done, st.finish, st.max_new)
    tokens, logprobs, num, done, finish = _record(fields, tok, lp, active, spec, cache.lengths, cache.max_len)
    return st.replace(cache=cache, next_token=tok, tokens=tokens, logprobs=logprobs, num_tokens=num, done=done,
                      finish=finish)


def rollout_chunk(params, state: RolloutState, *, graphdef, spec: RolloutSpec) -> RolloutState:
    """At most ``spec.chunk_steps`` decode steps; returns early when every row is done."""
    model: Decoder = nnx.merge(graphdef, params)

    def cond(carry):
        i, st = carry
        return (i < spec.chunk_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        return i + 1, decode_step(model, st, spec)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


# The programs on one device (or laid out by their inputs); ``rollout.host`` compiles the same functions with
# explicit shardings for a mesh.
START_STATIC = ("graphdef", "spec", "cache_len")
CHUNK_STATIC = ("graphdef", "spec")
start_rollout = jax.jit(rollout_start, static_argnames=START_STATIC)
decode_chunk = jax.jit(rollout_chunk, static_argnames=CHUNK_STATIC, donate_argnames=("state",))


# ------------------------------------------------------------------------------------------------ prompts


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, side: str = "left",
                multiple: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Pads token lists to a common length (rounded up to ``multiple``). Returns (tokens, valid)."""
    if not prompts:
        raise InputError("empty prompt batch")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise InputError(f"prompt {lens.index(0)} is empty")
    width = round_up(max(lens), multiple)
    toks = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        if side == "left":
            toks[i, width - len(p):] = p
            valid[i, width - len(p):] = True
        elif side == "right":
            toks[i, :len(p)] = p
            valid[i, :len(p)] = True
        else:
            raise InputError(f"padding side must be 'left' or 'right', got {side!r}")
    return toks, valid


class PreparedBatch(NamedTuple):
    tokens: np.ndarray  # [B, P] left/right padded prompts
    valid: np.ndarray  # [B, P] bool
    limits: np.ndarray  # [B] int32 per-row max new tokens
    cache_len: int
    longest: int  # longest prompt (tokens)


def prepare_batch(prompts: Sequence[Sequence[int]], spec: RolloutSpec, *, context_len: int = 0,
                  cache_len: Optional[int] = None, max_new: Optional[Sequence[int]] = None,
                  pad_side: str = "left") -> PreparedBatch:
    """Pads the prompts and checks them against the cache, the model's context (``context_len``; 0: unchecked)
    and the length limits."""
    toks, valid = pad_prompts(prompts, side=pad_side)
    longest = int(valid.sum(1).max())
    if cache_len is None:
        cache_len = default_cache_len(toks.shape[1], spec.max_new_tokens)
    if longest >= cache_len:
        raise InputError(f"a prompt of {longest} tokens does not fit a KV cache of {cache_len} slots "
                         f"(room for at least one new token is needed)")
    if context_len and longest > context_len:
        raise InputError(f"a prompt of {longest} tokens exceeds the model's context of {context_len}")
    b = len(prompts)
    limits = np.full((b,), spec.max_new_tokens, np.int32) if max_new is None else np.asarray(max_new, np.int32)
    if limits.shape != (b,) or limits.min() < 1 or limits.max() > spec.max_new_tokens:
        raise InputError(f"max_new must be {b} values in [1, {spec.max_new_tokens}]")
    return PreparedBatch(toks, valid, limits, cache_len, longest)
