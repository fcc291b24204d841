"""The drafter during RL: one object that owns the drafter module, its online data and its spot trainer.

The RL step hands each rollout :meth:`OnlineDrafter.rollout_input` (the drafter's parameters, whether it
proposes yet, and the spot trainer for idle replicas), calls :meth:`after_rollout` (the spot trainer's
averaged parameters back into the module; a drafter that was never warmed starts proposing after
``warm_after`` online updates), and feeds :meth:`add_features` the actor forward's hidden states (the next
steps' training data).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import optax
from flax import nnx

from tlt_jax.drafter.buffer import DrafterBuffer
from tlt_jax.drafter.spot import SpotSpec, SpotTrainer
from tlt_jax.drafter.train import split_drafter
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout.host import DrafterInput


class OnlineDrafter:
    """``drafter``: the module (warmed, or fresh when ``warm`` is False). ``spot``: train it on idle replicas
    (None: it stays frozen)."""

    def __init__(self, drafter: Drafter, *, warm: bool, target_graphdef=None, spot: Optional[SpotSpec] = None,
                 optimizer: Optional[optax.GradientTransformation] = None, seed: int = 0,
                 log: Callable[[str], None] = print):
        self.drafter, self.warm, self.log = drafter, bool(warm), log
        self.warm_after = spot.warm_after if spot is not None else 0
        self.buffer = self.trainer = None
        if spot is not None:
            self.buffer = DrafterBuffer(spot.buffer_capacity, spot.buffer_window, spot.buffer_lag)
            graphdef, params, frozen = split_drafter(drafter)
            self.trainer = SpotTrainer(graphdef, params, frozen, target_graphdef, self.buffer, optimizer,
                                       rows=spot.rows, seq_len=spot.seq_len, seed=seed, noise=spot.noise,
                                       max_steps_per_rollout=spot.max_steps_per_rollout,
                                       temperature=spot.temperature, dist_weight=spot.dist_weight)

    @property
    def graphdef(self):
        return nnx.split(self.drafter)[0]

    def rollout_input(self, rl_step: int, train: bool = True) -> DrafterInput:
        """What the rollout of RL step ``rl_step`` gets (``train`` False: no spot training in this rollout)."""
        if self.trainer is not None:
            self.trainer.rl_step = rl_step
        return DrafterInput(nnx.split(self.drafter)[1], proposes=self.warm,
                            trainer=self.trainer if train else None)

    def sync(self) -> None:
        """The spot trainer's averaged parameters into the drafter module."""
        if self.trainer is not None:
            graphdef, _, frozen = split_drafter(self.drafter)
            self.drafter = nnx.merge(graphdef, self.trainer.params, frozen)

    def after_rollout(self) -> None:
        self.sync()
        if self.trainer is not None and not self.warm and self.trainer.total_steps >= self.warm_after:
            self.warm = True
            self.log(f"[tlt] drafter warm after {self.trainer.total_steps} online updates: it drafts from now on")

    def add_features(self, step: int, tokens: np.ndarray, hidden: np.ndarray, valid: np.ndarray,
                     answer_start: int) -> None:
        """The actor forward's final hidden states of this step's answers (training data of the next steps)."""
        if self.buffer is not None:
            self.buffer.add(step, tokens, hidden, valid, answer_start=answer_start)

    # ------------------------------------------------------------------------------------------ checkpoints

    def state(self) -> Dict[str, Any]:
        """The pytrees a checkpoint keeps: the drafter's parameters and, with spot training, its optimizer
        state."""
        items = {"drafter": nnx.state(self.drafter, nnx.Param)}
        if self.trainer is not None:
            items["drafter_opt"] = self.trainer.opt_state
        return items

    def counters(self) -> Dict[str, Any]:
        return {"drafter_updates": self.trainer.total_steps if self.trainer is not None else 0,
                "drafter_warm": self.warm}

    def restore(self, items: Dict[str, Any], counters: Dict[str, Any]) -> None:
        """Inverse of :meth:`state` / :meth:`counters` (host or device arrays)."""
        nnx.update(self.drafter, items["drafter"])
        if self.trainer is not None:
            self.trainer.params = split_drafter(self.drafter)[1]
            self.trainer.opt_state = items["drafter_opt"]
            self.trainer.total_steps = int(counters.get("drafter_updates", 0))
        self.warm = bool(counters.get("drafter_warm", self.warm))
