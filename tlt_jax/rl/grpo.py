"""GRPO: group-normalised advantages, the PPO-clip policy loss, the actor's log-prob forward, a jitted update.

Batch layout (one row per answer): ``tokens`` [B, P + N] = the prompt left-padded to P, then the answer in
slots P..P+N-1 (right-padded); ``valid`` [B, P + N] marks real tokens; ``answer_mask`` [B, N] marks answer
tokens that are trained on. Answer token j is predicted by the logits at index P - 1 + j.
"""

from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlt_jax.models.decoder import Decoder

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
    b, l = valid.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    mask = jnp.tril(jnp.ones((l, l), bool))[None] & (valid[:, None, :] | jnp.eye(l, dtype=bool)[None])
    return positions, mask


def answer_logprobs(model: Decoder, tokens: jax.Array, valid: jax.Array, num_answer: int, temperature: float,
                    remat: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The actor's forward over prompt + answer.

    Returns (log-probs [B, N] of the answer tokens under softmax(logits / temperature), entropy [B, N] of that
    distribution, final-norm hidden states [B, P + N, H]).
    """
    b, l = tokens.shape
    p = l - num_answer
    positions, mask = _positions_and_mask(valid)
    idx = jnp.broadcast_to(jnp.arange(p - 1, l - 1, dtype=jnp.int32)[None], (b, num_answer))
    out = model(tokens, positions, mask, None, logit_index=idx, remat=remat)
    logits = out.logits.astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, p:, None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy, out.hidden


def _logprob(params, tokens, valid, *, graphdef, num_answer: int, temperature: float):
    """Jitted :func:`answer_logprobs` of the model ``(graphdef, params)`` (no gradients)."""
    model = nnx.merge(graphdef, params)
    return answer_logprobs(model, tokens, valid, num_answer, temperature)


logprob_forward = functools.partial(jax.jit, static_argnames=("graphdef", "num_answer", "temperature"))(_logprob)


def policy_loss(logp: jax.Array, batch: TrainBatch, cfg: GRPOConfig) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """PPO-clip loss with optional k3 KL, aggregated per ``cfg.aggregation``; returns (loss, metrics)."""
    m = batch.answer_mask.astype(jnp.float32)
    adv = batch.advantages[:, None]
    log_ratio = logp - batch.old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
    per_tok = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_tok)
    if cfg.kl_coef > 0:
        d = batch.ref_logp - logp
        kl = jnp.exp(d) - d - 1.0  # k3: unbiased, non-negative, low variance
        per_tok = per_tok + cfg.kl_coef * kl

    def agg(x):
        if cfg.aggregation == "token_mean":
            return (x * m).sum() / jnp.maximum(m.sum(), 1.0)
        per_seq = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        has = (m.sum(1) > 0).astype(jnp.float32)
        return (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)

    loss = agg(per_tok)
    clip_frac = agg((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32))
    return loss, {"pg_loss": loss, "kl": agg(kl), "clip_frac": clip_frac, "ratio_mean": agg(ratio)}


def make_optimizer(lr: float, weight_decay: float = 0.0, clip: float = 1.0, warmup_steps: int = 0
                   ) -> optax.GradientTransformation:
    sched = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, b1=0.9, b2=0.999,
                                                                    weight_decay=weight_decay))


def _update(params, opt_state, batch: TrainBatch, *, graphdef, optimizer: optax.GradientTransformation,
            cfg: GRPOConfig):
    """One optimizer step on a mini-batch. A non-finite loss or gradient leaves params and optimizer state
    unchanged (metrics['skipped'] = 1): the caller warns and the run goes on."""
    n = batch.answer_mask.shape[1]
    chex.assert_rank(batch.tokens, 2)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        logp, entropy, _ = answer_logprobs(model, batch.tokens, batch.valid, n, cfg.temperature, cfg.remat)
        loss, metrics = policy_loss(logp, batch, cfg)
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


update_step = functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "cfg"),
                                donate_argnames=("params", "opt_state"))(_update)
update_step.__doc__ = _update.__doc__


def batch_shardings(mesh, batch_size: int) -> TrainBatch:
    """Shardings of a :class:`TrainBatch` of ``batch_size`` rows: rows over the mesh's data and fsdp axes
    (replicated when they do not divide the batch), the other dimensions whole."""
    from tlt_jax.parallel.sharding import batch_sharding

    two = batch_sharding(mesh, (batch_size, 1))
    return TrainBatch(two, two, two, batch_sharding(mesh, (batch_size,)), two, two)


def sharded_update(mesh, graphdef, optimizer: optax.GradientTransformation, cfg: GRPOConfig, param_shardings,
                   opt_shardings, batch_shards: TrainBatch):
    """The update step compiled for a mesh: parameters and optimizer state stay laid out as given (FSDP and
    tensor parallelism by the sharding rules), the batch is split over rows, metrics come back replicated. The
    parameters and optimizer state passed in are donated. ``.lower(...)`` on abstract arrays compiles it ahead
    of time."""
    from jax.sharding import NamedSharding, PartitionSpec

    fn = functools.partial(_update, graphdef=graphdef, optimizer=optimizer, cfg=cfg)
    return jax.jit(fn, in_shardings=(param_shardings, opt_shardings, batch_shards),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=(0, 1))


def sharded_logprob(mesh, graphdef, num_answer: int, temperature: float, param_shardings, batch_shards: TrainBatch):
    """:func:`logprob_forward` compiled for a mesh: (params, tokens, valid) -> (log-probs, entropy, hidden), all
    split over rows like the batch."""
    from jax.sharding import NamedSharding, PartitionSpec

    rows = NamedSharding(mesh, PartitionSpec(batch_shards.tokens.spec[0]))
    fn = functools.partial(_logprob, graphdef=graphdef, num_answer=num_answer, temperature=temperature)
    return jax.jit(fn, in_shardings=(param_shardings, batch_shards.tokens, batch_shards.valid),
                   out_shardings=(batch_shards.old_logp, batch_shards.old_logp, rows))
