"""GRPO: group-normalised advantages, the PPO-clip policy loss, the actor's log-prob forward, a jitted update.

Batch layout (one row per answer): ``tokens`` [B, P + N] = the prompt left-padded to P, then the answer in
slots P..P+N-1 (right-padded); ``valid`` [B, P + N] marks real tokens; ``answer_mask`` [B, N] marks answer
tokens that are trained on. Answer token j is predicted by the logits at index P - 1 + j.
"""

from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from tlt_jax.models.decoder import Decoder, padded_causal_mask
from tlt_jax.parallel.sharding import batch_sharding

ADVANTAGES = ("grpo", "drgrpo")
AGGREGATIONS = ("token_mean", "seq_mean")


class GRPOConfig(NamedTuple):
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0: low-variance KL (k3) to the frozen reference, added to the loss
    aggregation: str = "token_mean"  # 'token_mean' (over all answer tokens) or 'seq_mean' (per answer, then mean)
    temperature: float = 1.0  # the rollout's sampling temperature: log-probs are of logits / temperature
    remat: bool = False  # recompute each layer's activations in the backward pass (train.remat)


class TrainBatch(NamedTuple):
    tokens: jax.Array  # [B, P + N] int32
    valid: jax.Array  # [B, P + N] bool
    answer_mask: jax.Array  # [B, N] bool
    advantages: jax.Array  # [B] float32
    old_logp: jax.Array  # [B, N] float32 (actor log-probs before this step's updates)
    ref_logp: jax.Array  # [B, N] float32 (frozen reference; zeros when kl_coef = 0)


def group_advantages(rewards: np.ndarray, kind: str = "grpo", eps: float = 1e-6) -> np.ndarray:
    """rewards [num_prompts, G] -> advantages [num_prompts * G].

    'grpo': (r - group mean) / (group std + eps); 'drgrpo' (Dr. GRPO): r - group mean (no std division).
    A group whose answers all score the same gets advantage 0 (it carries no signal).
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_prompts, group_size], got shape {r.shape}")
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind must be one of {ADVANTAGES}, got {kind!r}")
    centred = r - r.mean(axis=1, keepdims=True)
    if kind == "grpo":
        centred = centred / (r.std(axis=1, keepdims=True) + eps)
    return centred.reshape(-1).astype(np.float32)


def _positions_and_mask(valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    return positions, padded_causal_mask(valid)


LOGIT_CHUNK = 128  # answer positions whose vocabulary-sized log-probabilities exist at one time


def _answer_head(model: Decoder, hidden: jax.Array, targets: jax.Array, temperature: float):
    """(log-prob of each target, entropy) under softmax(LM head(hidden) / temperature); [B, C] each."""
    logits = model.logits(hidden).astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def answer_logprobs(model: Decoder, tokens: jax.Array, valid: jax.Array, num_answer: int, temperature: float,
                    remat: bool = False, chunk: int = LOGIT_CHUNK) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The actor's forward over prompt + answer.

    Returns (log-probs [B, N] of the answer tokens under softmax(logits / temperature), entropy [B, N] of that
    distribution, final-norm hidden states [B, P + N, H]). Past ``chunk`` answer positions the LM head runs
    over ``chunk`` positions at a time and is recomputed in the backward pass, so the [B, N, vocab] logits
    never exist whole: the vocabulary-sized arrays of a long answer would otherwise dominate the memory.
    """
    b, l = tokens.shape
    p = l - num_answer
    positions, mask = _positions_and_mask(valid)
    idx = jnp.broadcast_to(jnp.arange(p - 1, l - 1, dtype=jnp.int32)[None], (b, num_answer))
    out = model(tokens, positions, mask, None, logit_index=idx[:, :0], remat=remat)  # hidden states, no logits
    h = jnp.take_along_axis(out.hidden, idx[..., None], axis=1)
    if num_answer <= chunk:  # one chunk: nothing to bound, and no recomputation to pay for
        logp, entropy = _answer_head(model, h, tokens[:, p:], temperature)
        return logp, entropy, out.hidden
    head = nnx.remat(lambda m, hc, tc: _answer_head(m, hc, tc, temperature))
    parts = [head(model, h[:, s:s + chunk], tokens[:, p + s:p + s + chunk]) for s in range(0, num_answer, chunk)]
    logp = jnp.concatenate([x[0] for x in parts], axis=1)
    entropy = jnp.concatenate([x[1] for x in parts], axis=1)
    return logp, entropy, out.hidden


def _logprob(params, tokens, valid, *, graphdef, num_answer: int, temperature: float):
    """Jitted :func:`answer_logprobs` of the model ``(graphdef, params)`` (no gradients)."""
    model = nnx.merge(graphdef, params)
    return answer_logprobs(model, tokens, valid, num_answer, temperature)


logprob_forward = functools.partial(jax.jit, static_argnames=("graphdef", "num_answer", "temperature"))(_logprob)


def policy_loss(logp: jax.Array, batch: TrainBatch, config: GRPOConfig) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """PPO-clip loss with optional k3 KL, aggregated per ``config.aggregation``; returns (loss, metrics)."""
    m = batch.answer_mask.astype(jnp.float32)
    adv = batch.advantages[:, None]
    log_ratio = logp - batch.old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps) * adv
    per_tok = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_tok)
    if config.kl_coef > 0:
        d = batch.ref_logp - logp
        kl = jnp.exp(d) - d - 1.0  # k3: unbiased, non-negative, low variance
        per_tok = per_tok + config.kl_coef * kl

    def agg(x):
        if config.aggregation == "token_mean":
            return (x * m).sum() / jnp.maximum(m.sum(), 1.0)
        per_seq = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        has = (m.sum(1) > 0).astype(jnp.float32)
        return (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)

    loss = agg(per_tok)
    clip_frac = agg((jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32))
    return loss, {"pg_loss": loss, "kl": agg(kl), "clip_frac": clip_frac, "ratio_mean": agg(ratio)}


def _update(params, opt_state, batch: TrainBatch, *, graphdef, optimizer: optax.GradientTransformation,
            config: GRPOConfig):
    """One optimizer step on a mini-batch. A non-finite loss or gradient leaves params and optimizer state
    unchanged (metrics['skipped'] = 1): the caller warns and the run goes on."""
    n = batch.answer_mask.shape[1]
    chex.assert_rank(batch.tokens, 2)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        logp, entropy, _ = answer_logprobs(model, batch.tokens, batch.valid, n, config.temperature, config.remat)
        loss, metrics = policy_loss(logp, batch, config)
        m = batch.answer_mask.astype(jnp.float32)
        metrics["entropy"] = jax.lax.stop_gradient((entropy * m).sum() / jnp.maximum(m.sum(), 1.0))
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    params = keep(new_params, params)
    opt_state = keep(new_opt, opt_state)
    metrics["grad_norm"] = gnorm
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return params, opt_state, metrics


update_step = functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "config"),
                                donate_argnames=("params", "opt_state"))(_update)
update_step.__doc__ = _update.__doc__


def batch_shardings(mesh, batch_size: int) -> TrainBatch:
    """Shardings of a :class:`TrainBatch` of ``batch_size`` rows: rows over the mesh's data and fsdp axes
    (replicated when they do not divide the batch), the other dimensions whole."""
    two = batch_sharding(mesh, (batch_size, 1))
    return TrainBatch(two, two, two, batch_sharding(mesh, (batch_size,)), two, two)


def sharded_update(mesh, graphdef, optimizer: optax.GradientTransformation, config: GRPOConfig, param_shardings,
                   opt_shardings, batch_shards: TrainBatch):
    """The update step compiled for a mesh: parameters and optimizer state stay laid out as given (FSDP and
    tensor parallelism by the sharding rules), the batch is split over rows, metrics come back replicated. The
    parameters and optimizer state passed in are donated. ``.lower(...)`` on abstract arrays compiles it ahead
    of time."""
    fn = functools.partial(_update, graphdef=graphdef, optimizer=optimizer, config=config)
    return jax.jit(fn, in_shardings=(param_shardings, opt_shardings, batch_shards),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=(0, 1))


def sharded_logprob(mesh, graphdef, num_answer: int, temperature: float, param_shardings, batch_shards: TrainBatch):
    """:func:`logprob_forward` compiled for a mesh: (params, tokens, valid) -> (log-probs, entropy, hidden), all
    split over rows like the batch."""
    rows = NamedSharding(mesh, PartitionSpec(batch_shards.tokens.spec[0]))
    fn = functools.partial(_logprob, graphdef=graphdef, num_answer=num_answer, temperature=temperature)
    return jax.jit(fn, in_shardings=(param_shardings, batch_shards.tokens, batch_shards.valid),
                   out_shardings=(batch_shards.old_logp, batch_shards.old_logp, rows))
