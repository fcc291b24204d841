"""A jitted drafter update (optax), shared by the offline warm-up and the online spot trainer (the optimizer
comes from ``core.optim.make_optimizer``)."""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import optax
from flax import nnx

from tlt_jax.drafter.loss import drafter_loss
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter


def split_drafter(drafter: Drafter):
    """(graphdef, trainable parameters, frozen state: the draft vocabulary)."""
    return nnx.split(drafter, nnx.Param, ...)


@functools.partial(jax.jit, static_argnames=("drafter_graphdef", "target_graphdef", "optimizer", "noise", "temperature",
                                             "dist_weight"),
                   donate_argnames=("drafter_params", "opt_state"))
def train_step(drafter_params, drafter_frozen, opt_state, target_params, tokens, feats, loss_mask, key=None,
               segments=None, *, drafter_graphdef, target_graphdef, optimizer: optax.GradientTransformation,
               noise: float = 0.0, temperature: float = 0.0, dist_weight: float = 0.0
               ) -> Tuple[object, object, Dict[str, jax.Array]]:
    """One update of the drafter's own parameters; the target's (embedding, head) are read, not trained.

    ``key`` and ``noise``: optional uniform input-feature noise (see :func:`drafter_loss`).
    ``segments``: optional [B, L] int32 segment ids of packed rows (0 = padding; see :func:`drafter_loss`).
    ``temperature``, ``dist_weight``: the distribution term at the rollout temperature (see :func:`drafter_loss`).
    """
    target: Decoder = nnx.merge(target_graphdef, target_params)

    def loss_fn(p):
        drafter = nnx.merge(drafter_graphdef, p, drafter_frozen)
        return drafter_loss(drafter, target, tokens, feats, loss_mask, drafter.head_weight(target), key, noise,
                            segments, temperature, dist_weight)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(drafter_params)
    updates, opt_state = optimizer.update(grads, opt_state, drafter_params)
    drafter_params = optax.apply_updates(drafter_params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return drafter_params, opt_state, metrics
