"""The spot trainer: drafter updates on rollout replicas whose rows are all done.

During a rollout the adaptive engine hands a finished replica's devices to :meth:`SpotTrainer.step`, once per
chunk of the replicas still decoding: one EAGLE update of that replica's copy of the drafter, on a packed batch
from the :class:`~tlt_jax.drafter.buffer.DrafterBuffer` (features of the previous RL step(s)), dispatched
asynchronously on the replica's sub-mesh (the batch is split over its devices: data parallel). When the rollout
ends no further step is dispatched (the trainer is preempted at step granularity) and :meth:`end` averages the
replicas' drafters (and optimizer states) that trained back into one, across processes too.

Only the drafter's own weights train; the embedding and LM head are the policy's, read from the replica's copy
of the policy parameters.
"""

from __future__ import annotations

import time
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tlt_jax.core.seeds import numpy_stream, stream_seed
from tlt_jax.drafter.buffer import DrafterBuffer
from tlt_jax.drafter.train import train_step
from tlt_jax.parallel.multihost import allgather


class SpotSpec(NamedTuple):
    """Online drafter training (``tlt.spot_*``, ``tlt.buffer_*``, ``tlt.warm_after``)."""

    rows: int = 4  # packed rows per update
    seq_len: int = 256
    noise: float = 0.0  # uniform noise on the drafter's input features while training
    max_steps_per_rollout: int = 0  # 0: until the rollout ends
    warm_after: int = 20  # a drafter that was never warmed proposes after this many online updates
    buffer_capacity: int = 256  # answers held by the data buffer
    buffer_window: int = 512  # the last <= this many tokens of an answer are kept
    buffer_lag: int = 2  # features of the last this-many RL steps are sampled
    temperature: float = 0.0  # the loss's distribution term at this temperature (the rollout's; 0: off)
    dist_weight: float = 0.0


class SpotTrainer:
    """Holds the drafter's trainable parameters and optimizer state between rollouts.

    Args:
      drafter_graphdef, drafter_params, drafter_frozen: ``split_drafter(drafter)``.
      target_graphdef: the policy's graphdef (embedding and head are read from the policy parameters).
      buffer: the drafter data buffer; ``step`` samples from it with the one-step offset.
      rows, seq_len: packed batch shape of one update.
    """

    def __init__(self, drafter_graphdef, drafter_params, drafter_frozen, target_graphdef, buffer: DrafterBuffer,
                 optimizer: optax.GradientTransformation, *, rows: int = 4, seq_len: int = 256, seed: int = 0,
                 noise: float = 0.0, max_steps_per_rollout: int = 0, temperature: float = 0.0,
                 dist_weight: float = 0.0, gather=None):
        self.drafter_graphdef, self.drafter_frozen = drafter_graphdef, drafter_frozen
        self.target_graphdef = target_graphdef
        self.params = drafter_params
        self.optimizer = optimizer
        self.opt_state = optimizer.init(drafter_params)
        self.buffer = buffer
        self.rows, self.seq_len, self.seed, self.noise = int(rows), int(seq_len), int(seed), float(noise)
        self.temperature, self.dist_weight = float(temperature), float(dist_weight)
        self.max_steps = int(max_steps_per_rollout)
        self._gather = gather
        self.rl_step = 0
        self.total_steps = 0
        self._live: Dict[int, Dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------ rollout hooks

    def begin(self, replicas, policy_params: Dict[int, Any]) -> None:
        """Called by the engine after the prefill: one drafter copy per local replica."""
        self._live = {}
        self._replicas = replicas
        host_params, host_opt = jax.device_get((self.params, self.opt_state))
        for r in replicas:
            if not r.local:
                continue
            rep = NamedSharding(r.mesh, P())
            self._live[r.index] = {
                # fresh buffers (from host copies): the update donates them, the master copy must survive
                "replica": r, "params": jax.device_put(host_params, rep), "opt": jax.device_put(host_opt, rep),
                "frozen": jax.device_put(self.drafter_frozen, rep), "target_params": policy_params[r.index],
                "rng": numpy_stream(self.seed, "spot_batches", self.rl_step, r.index), "steps": 0, "metrics": [],
                "key": jax.random.PRNGKey(stream_seed(self.seed, "spot_noise", self.rl_step, r.index)), "t": 0.0}

    def step(self, replica_index: int) -> bool:
        """Dispatches one update on the replica (no wait); False when there is no data or the cap is reached."""
        s = self._live[replica_index]
        if self.max_steps and s["steps"] >= self.max_steps:
            return False
        batch = self.buffer.sample(s["rng"], self.rl_step, self.rows, self.seq_len)
        if batch is None:
            return False
        t0 = time.perf_counter()
        r = s["replica"]
        n = r.data_size
        split = NamedSharding(r.mesh, P("data") if self.rows % n == 0 and n > 1 else P())
        tokens, feats, mask, seg = (jax.device_put(x, split) for x in
                                    (batch.tokens, batch.feats, batch.loss_mask, batch.segments))
        s["key"], key = jax.random.split(s["key"])
        s["params"], s["opt"], met = train_step(s["params"], s["frozen"], s["opt"], s["target_params"], tokens,
                                                feats, mask, key, segments=seg,
                                                drafter_graphdef=self.drafter_graphdef,
                                                target_graphdef=self.target_graphdef, optimizer=self.optimizer,
                                                noise=self.noise, temperature=self.temperature,
                                                dist_weight=self.dist_weight)
        s["metrics"].append(met)
        s["steps"] += 1
        s["t"] += time.perf_counter() - t0
        return True

    def end(self) -> Dict[str, float]:
        """Waits for the dispatched steps, averages the trained copies, returns the rollout's drafter metrics."""
        trained = [s for s in self._live.values() if s["steps"] > 0]
        losses = [float(m["loss"]) for s in trained for m in jax.device_get(s["metrics"])]
        top1 = [float(m["top1"]) for s in trained for m in jax.device_get(s["metrics"])]
        steps_local = np.zeros(len(self._replicas), np.float64)
        for s in trained:
            steps_local[s["replica"].index] = s["steps"]
        host = [(jax.device_get(s["params"]), jax.device_get(s["opt"])) for s in trained]
        # Sum over local trained copies, then over processes; divide by the number of trained copies.
        count = np.array([float(len(host))])
        summed = None
        if host:
            summed = jax.tree.map(lambda *x: np.sum(np.stack([np.asarray(v, np.float64) for v in x]), 0), *host)
        if jax.process_count() > 1 or self._gather is not None:
            gather = self._gather or allgather
            count_all = gather(count).sum()
            steps_all = gather(steps_local).sum(0)
            zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float64),
                                 (jax.device_get(self.params), jax.device_get(self.opt_state)))
            part = summed if summed is not None else zeros
            summed = jax.tree.map(lambda x: gather(np.asarray(x)).sum(0), part)
        else:
            gather = None
            count_all, steps_all = float(len(host)), steps_local
        # loss and top-1 over every trained copy of every process (NaN when no drafter step ran)
        sums = np.array([float(np.sum(losses)), float(np.sum(top1)), float(len(losses))])
        if gather is not None:
            sums = gather(sums).sum(0)
        mean_loss, mean_top1 = ((float(sums[0] / sums[2]), float(sums[1] / sums[2])) if sums[2]
                                else (float("nan"), float("nan")))
        if count_all > 0:
            like = (self.params, self.opt_state)
            avg = jax.tree.map(lambda s_, ref: np.asarray(s_ / count_all).astype(np.asarray(ref).dtype), summed,
                               jax.device_get(like))
            self.params = jax.tree.map(jnp.asarray, avg[0])
            self.opt_state = jax.tree.map(jnp.asarray, avg[1])
        n_steps = int(np.sum(steps_all))
        self.total_steps += n_steps
        out = {"drafter_steps": n_steps, "drafter_loss": mean_loss, "drafter_top1": mean_top1,
               "drafter_replicas_trained": int(count_all), "drafter_dispatch_s": float(sum(
                   s["t"] for s in self._live.values())), "drafter_total_steps": self.total_steps}
        self._live = {}
        return out
