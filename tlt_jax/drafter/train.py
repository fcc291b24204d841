"""A jitted drafter update (optax), shared by the offline warm-up and the online spot trainer."""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import optax
from flax import nnx

from tlt_jax.drafter.loss import drafter_loss
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter


def make_optimizer(lr: float, total_steps: int, warmup_steps: int = 20, weight_decay: float = 0.0,
                   clip: float = 1.0) -> optax.GradientTransformation:
    warmup_steps = max(1, min(warmup_steps, total_steps // 2))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                               end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=weight_decay))


def split_drafter(drafter: Drafter):
    """(graphdef, trainable params, other state such as the draft vocabulary)."""
    return nnx.split(drafter, nnx.Param, ...)


@functools.partial(jax.jit, static_argnames=("dgraphdef", "tgraphdef", "optimizer", "noise"),
                   donate_argnames=("dparams", "opt_state"))
def train_step(dparams, drest, opt_state, tparams, tokens, feats, loss_mask, key=None, segments=None, *, dgraphdef,
               tgraphdef, optimizer: optax.GradientTransformation, noise: float = 0.0
               ) -> Tuple[object, object, Dict[str, jax.Array]]:
    """One update of the drafter's own parameters; the target's (embedding, head) are read, not trained.

    ``key`` and ``noise``: optional uniform input-feature noise (see :func:`drafter_loss`).
    ``segments``: optional [B, L] int32 segment ids of packed rows (0 = padding; see :func:`drafter_loss`).
    """
    target: Decoder = nnx.merge(tgraphdef, tparams)

    def loss_fn(p):
        drafter = nnx.merge(dgraphdef, p, drest)
        return drafter_loss(drafter, target, tokens, feats, loss_mask, drafter.head_weight(target), key, noise,
                            segments)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(dparams)
    updates, opt_state = optimizer.update(grads, opt_state, dparams)
    dparams = optax.apply_updates(dparams, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return dparams, opt_state, metrics
