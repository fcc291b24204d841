"""Plain (non-speculative) rollout: a jitted prefill and a jitted chunk of K decode steps.

The rollout state is one pytree with static shapes. A chunk is a ``lax.while_loop`` of at most K decode
steps that stops early once every row is done; finished rows are frozen by their ``done`` flag (they write
nothing). The host regains control between chunks and reads only the done flags.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.errors import InputError
from tlt_jax.models.decoder import Decoder, decode, prefill
from tlt_jax.models.kv_cache import KVCache, init_cache
from tlt_jax.rollout.sampling import SamplingParams, sample

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
    rng: jax.Array


def is_stop_token(tok: jax.Array, spec: RolloutSpec) -> jax.Array:
    """Bool array shaped like ``tok``: which tokens are stop tokens of ``spec``."""
    if not spec.stop_tokens:
        return jnp.zeros(tok.shape, bool)
    return jnp.isin(tok, jnp.asarray(spec.stop_tokens, jnp.int32))


def _record(state_fields, tok, lp, active, spec: RolloutSpec, cache_len_now, cache_size):
    """Appends the sampled token of active rows and updates done / finish."""
    tokens, logprobs, num, done, finish, max_new = state_fields
    b, n = tokens.shape
    rows = jnp.arange(b)
    col = jnp.where(active, num, n)
    tokens = tokens.at[rows, col].set(tok, mode="drop")
    logprobs = logprobs.at[rows, col].set(lp.astype(logprobs.dtype), mode="drop")
    num = num + active.astype(jnp.int32)
    is_stop = is_stop_token(tok, spec)
    at_len = num >= max_new
    cache_full = cache_len_now >= cache_size
    reason = jnp.where(is_stop, FINISH_STOP, jnp.where(at_len, FINISH_LENGTH,
                                                         jnp.where(cache_full, FINISH_CACHE, FINISH_RUNNING)))
    newly = active & (reason != FINISH_RUNNING)
    finish = jnp.where(newly, reason, finish)
    done = done | newly
    return tokens, logprobs, num, done, finish


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "cache_len"))
def start_rollout(params, prompt_tokens, prompt_valid, max_new, rng, *, graphdef, spec: RolloutSpec,
                  cache_len: int) -> RolloutState:
    """Prefill the prompts into a fresh cache and sample each row's first token.

    prompt_tokens / prompt_valid: [B, P] (left or right padded); max_new: [B] int32.
    """
    model: Decoder = nnx.merge(graphdef, params)
    b = prompt_tokens.shape[0]
    cache = _constrain_cache(init_cache(model.cfg, b, cache_len))
    logits, _, cache = prefill(model, prompt_tokens, prompt_valid, cache, use_prefix=False,
                               attn_impl=spec.attn_impl)
    rng, key = jax.random.split(rng)
    tok, lp = sample(key, logits[:, 0], spec.sampling)
    n = spec.max_new_tokens
    fields = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), jnp.int32),
              jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), max_new)
    tokens, logprobs, num, done, finish = _record(fields, tok, lp, jnp.ones((b,), bool), spec, cache.lengths,
                                                  cache_len)
    return RolloutState(cache=cache, next_token=tok, tokens=tokens, logprobs=logprobs, num_tokens=num, done=done,
                        finish=finish, max_new=max_new, rng=rng)


def _constrain_cache(cache: KVCache) -> KVCache:
    """Under a mesh (``jax.set_mesh``), lays the cache out batch over data x fsdp and KV heads over tensor."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache
    from tlt_jax.parallel.mesh import BATCH_AXES
    from tlt_jax.parallel.sharding import fit_spec

    spec = fit_spec(cache.k[0].shape, (BATCH_AXES, "tensor"), mesh)
    wsc = jax.lax.with_sharding_constraint
    return cache.replace(k=tuple(wsc(x, spec) for x in cache.k), v=tuple(wsc(x, spec) for x in cache.v))


def decode_step(model: Decoder, st: RolloutState, spec: RolloutSpec) -> RolloutState:
    active = ~st.done
    logits, _, cache = decode(model, st.next_token, st.cache, active, attn_impl=spec.attn_impl)
    rng, key = jax.random.split(st.rng)
    tok, lp = sample(key, logits, spec.sampling)
    tok = jnp.where(active, tok, st.next_token)
    fields = (st.tokens, st.logprobs, st.num_tokens, st.done, st.finish, st.max_new)
    tokens, logprobs, num, done, finish = _record(fields, tok, lp, active, spec, cache.lengths, cache.max_len)
    return st.replace(cache=cache, next_token=tok, tokens=tokens, logprobs=logprobs, num_tokens=num, done=done,
                      finish=finish, rng=rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("state",))
def decode_chunk(params, state: RolloutState, *, graphdef, spec: RolloutSpec) -> RolloutState:
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


# ------------------------------------------------------------------------------------------------ host


class RolloutResult(NamedTuple):
    tokens: List[List[int]]  # answer tokens per row (stop token included)
    logprobs: List[np.ndarray]
    lengths: np.ndarray  # [B]
    finish_reasons: List[str]
    prefill_s: float
    decode_s: float
    num_chunks: int


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, side: str = "left",
                multiple: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Pads token lists to a common length (rounded up to ``multiple``). Returns (tokens, valid)."""
    if not prompts:
        raise InputError("empty prompt batch")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise InputError(f"prompt {lens.index(0)} is empty")
    width = -(-max(lens) // multiple) * multiple
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


def _place(x: np.ndarray, mesh) -> jax.Array:
    """Device array; with a mesh (which may span several processes), split over the batch axes."""
    if mesh is None:
        return jnp.asarray(x)
    from tlt_jax.parallel.sharding import batch_sharding, to_global

    return to_global(x, batch_sharding(mesh, x.shape))


def default_cache_len(prompt_width: int, max_new_tokens: int, multiple: int = 64) -> int:
    return -(-(prompt_width + max_new_tokens) // multiple) * multiple


class PreparedBatch(NamedTuple):
    tokens: np.ndarray  # [B, P] left/right padded prompts
    valid: np.ndarray  # [B, P] bool
    limits: np.ndarray  # [B] int32 per-row max new tokens
    cache_len: int
    longest: int  # longest prompt (tokens)


def prepare_batch(model: Decoder, prompts: Sequence[Sequence[int]], spec: RolloutSpec, *,
                  cache_len: Optional[int] = None, max_new: Optional[Sequence[int]] = None,
                  pad_side: str = "left") -> PreparedBatch:
    """Pads the prompts and checks them against the cache, the model's context and the length limits."""
    toks, valid = pad_prompts(prompts, side=pad_side)
    longest = int(valid.sum(1).max())
    if cache_len is None:
        cache_len = default_cache_len(toks.shape[1], spec.max_new_tokens)
    if longest >= cache_len:
        raise InputError(f"a prompt of {longest} tokens does not fit a KV cache of {cache_len} slots "
                         f"(room for at least one new token is needed)")
    if model.cfg.max_position_embeddings and longest > model.cfg.max_position_embeddings:
        raise InputError(f"a prompt of {longest} tokens exceeds the model's context of "
                         f"{model.cfg.max_position_embeddings}")
    b = len(prompts)
    limits = np.full((b,), spec.max_new_tokens, np.int32) if max_new is None else np.asarray(max_new, np.int32)
    if limits.shape != (b,) or limits.min() < 1 or limits.max() > spec.max_new_tokens:
        raise InputError(f"max_new must be {b} values in [1, {spec.max_new_tokens}]")
    return PreparedBatch(toks, valid, limits, cache_len, longest)


def generate(model: Decoder, prompts: Sequence[Sequence[int]], spec: RolloutSpec, *, seed: int = 0,
             cache_len: Optional[int] = None, max_new: Optional[Sequence[int]] = None, pad_side: str = "left",
             on_chunk: Optional[Callable[[RolloutState], None]] = None, mesh=None) -> RolloutResult:
    """Runs a plain rollout to completion (host loop over jitted chunks).

    With ``mesh``, the model's parameters should already be placed on it (``parallel.shard_model``); the
    prompt batch is split over the data and fsdp axes and the cache follows.
    """
    if mesh is not None and jax.sharding.get_abstract_mesh().empty:
        with jax.set_mesh(mesh):
            return generate(model, prompts, spec, seed=seed, cache_len=cache_len, max_new=max_new,
                            pad_side=pad_side, on_chunk=on_chunk, mesh=mesh)
    graphdef, params = nnx.split(model)
    batch = prepare_batch(model, prompts, spec, cache_len=cache_len, max_new=max_new, pad_side=pad_side)
    cache_len = batch.cache_len
    b = len(prompts)
    toks, valid, limits = (_place(x, mesh) for x in (batch.tokens, batch.valid, batch.limits))
    t0 = time.perf_counter()
    st = start_rollout(params, toks, valid, limits,
                       jax.random.PRNGKey(seed), graphdef=graphdef, spec=spec, cache_len=cache_len)
    from tlt_jax.parallel.sharding import to_host

    done = to_host(st.done)
    t1 = time.perf_counter()
    chunks = 0
    while not done.all():
        st = decode_chunk(params, st, graphdef=graphdef, spec=spec)
        chunks += 1
        done = to_host(st.done)
        if on_chunk is not None:
            on_chunk(st)
    t2 = time.perf_counter()
    num, all_toks, all_lp, finish = (to_host(x) for x in (st.num_tokens, st.tokens, st.logprobs, st.finish))
    return RolloutResult(
        tokens=[all_toks[i, :num[i]].tolist() for i in range(b)],
        logprobs=[all_lp[i, :num[i]] for i in range(b)],
        lengths=num,
        finish_reasons=[FINISH_NAMES[int(f)] for f in finish],
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        num_chunks=chunks,
    )
