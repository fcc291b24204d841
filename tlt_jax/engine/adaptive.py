"""The adaptive rollout engine: replicas, batch compaction, speculation on demand, BEG-MAB, a program pool.

A rollout batch is split over ``replicas``: fixed sub-meshes of the device set, each running its own rows with
its own chunk loop. The host loop, once per chunk:

1. **Decide** for every replica from the *gathered* counters of the last chunk (identical on every process):
   a replica with live rows is compacted into the smallest power-of-two bucket that holds them (finished rows
   are harvested to the host first), decodes plainly while its bucket is above ``sd_threshold`` and otherwise
   runs the strategy the bucket's bandit picks (``plain`` can be an arm too: speculation must earn its place);
   a replica with no live rows hands its devices to the spot trainer (one drafter step per chunk, so the
   trainer is preempted at step granularity when the rollout ends).
2. **Dispatch** every local replica's chunk (a program from the pool, compiled ahead of time for its bucket
   and arm) and drafter step without waiting: replicas on different accelerators run concurrently (the XLA
   devices of one CPU process share its cores, so there they take turns).
3. **Gather** the small counters (live rows, committed tokens, chunk seconds) of every replica from every
   process, update the bandits in replica order, and go on until no replica has live rows.

Speculation keeps one state type (``SpecState``) whatever the arm: plain steps are speculative steps with no
drafts, and the drafter's cache follows every commit, so switching speculation on, changing the strategy and
compacting the batch cost nothing but a row gather. The learned drafter proposes once it is warm
(``DrafterInput.proposes``); until then the model-free arms (``ngram_arms``: the n-gram or group proposer) serve.
The text table the model-free proposers read is not per row (``SHARED_LEAVES``): compaction keeps it whole, so
finished siblings keep serving, and the group proposer's store of earlier answers lives across rollouts.

The engine is a :class:`~tlt_jax.rollout.host.Rollout`: ``generate(params, prompts, seed=..., drafter=...)``
returns a ``RolloutOutput`` with the engine's statistics and decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.core.shapes import next_pow2
from tlt_jax.core.trees import path_name
from tlt_jax.engine.bandit import BucketBandit
from tlt_jax.engine.pool import ProgramPool, relocate
from tlt_jax.parallel.multihost import allgather
from tlt_jax.parallel.replicas import Replica, make_replicas
from tlt_jax.parallel.sharding import to_mesh
from tlt_jax.rollout.decode import RolloutSpec, pad_prompts
from tlt_jax.rollout.host import DrafterInput, RolloutOutput, harvest, output_from_rows
from tlt_jax.rollout.speculative import SpecState, SpeculativeSpec, speculative_chunk, start_speculative
from tlt_jax.rollout.suffix import GroupStore, group_inputs


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (``app.specs.engine_config`` builds them from ``tlt.*`` and checks them)."""

    replicas: int = 1
    replica_tensor: int = 1  # tensor parallelism inside a replica (models too big for one device)
    sd_threshold: int = 32  # speculation is considered once a replica's bucket is at most this many rows
    arms: Tuple[str, ...] = ("chain-4", "4_2_8")  # strategies with the learned drafter
    ngram_arms: Tuple[str, ...] = ("ngram:chain-3",)  # strategies while the drafter is not warm
    plain_arm: bool = True  # plain decoding competes with the strategies below the threshold
    epsilon: float = 0.1
    window: int = 8
    compact: bool = True
    max_programs: int = 64
    speculation: SpeculativeSpec = SpeculativeSpec()  # the arms' matching settings (ngram_max, suffix_max, ...)
    group_sources: int = 16  # texts a row drafts from with the group proposer (own, siblings, stored answers)
    group_store: int = 0  # answers kept per prompt for the group proposer across rollouts (0: none)
    seed: int = 0


OUT_FIELDS = ("tokens", "logprobs", "num_tokens", "finish", "accepted", "verifies")  # harvested per row
SHARED_LEAVES = ("rng", "history", "history_len")  # state leaves not per row: kept whole when rows are compacted


@jax.jit
def _take_rows(state: SpecState, idx: jax.Array) -> SpecState:
    """The rows ``idx`` of every per-row leaf (compaction)."""

    def take(path, x):
        if path_name(path) in SHARED_LEAVES:
            return x
        return jnp.take(x, idx, axis=0)
    return jax.tree_util.tree_map_with_path(take, state)


def _on_mesh(replica: Replica, lower: Callable[[], Any]):
    """``lower()`` traced under the replica's mesh (the attention kernels run per shard of it), compiled."""
    with jax.set_mesh(replica.mesh):
        lowered = lower()
    return lowered.compile()


@dataclasses.dataclass
class _Run:
    """One replica's rollout in progress (host bookkeeping)."""
    replica: Replica
    rows: np.ndarray  # original row index of each state row (-1: padding)
    state: Any = None
    bucket: int = 0
    live: int = 0
    finished_at: Optional[float] = None
    num_host: Optional[np.ndarray] = None  # tokens per state row at the last read
    t_dispatch: float = 0.0


class AdaptiveEngine:
    """Runs rollouts of ``graphdef`` models; keeps its bandits and compiled programs across rollouts."""

    def __init__(self, graphdef, spec: RolloutSpec, config: EngineConfig, *, batch_size: int, cache_len: int,
                 drafter_graphdef=None, devices: Optional[Sequence[jax.Device]] = None,
                 pool: Optional[ProgramPool] = None, gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 prompt_multiple: int = 32):
        self.graphdef, self.drafter_graphdef, self.spec, self.config = graphdef, drafter_graphdef, spec, config
        self.cache_len = int(cache_len)
        self.prompt_multiple = int(prompt_multiple)  # prompts are padded to a multiple: few prefill programs
        self.replicas = make_replicas(config.replicas, devices, config.replica_tensor)
        if batch_size % config.replicas:
            raise ConfigError(f"a rollout batch of {batch_size} rows does not split over {config.replicas} replicas")
        self.batch_size = int(batch_size)
        self.rows_per_replica = batch_size // config.replicas
        self.top_bucket = next_pow2(self.rows_per_replica)
        self.buckets = [self.top_bucket >> i for i in range(self.top_bucket.bit_length())]
        self.store = GroupStore(config.group_store) if config.group_store else None
        self.pool = pool if pool is not None else ProgramPool(config.max_programs)
        self.start_pool = ProgramPool(8)  # prefill programs, one per prompt width (kept apart from the chunks)
        self._gather = gather
        self.bandits: Dict[str, BucketBandit] = {}
        for phase, arms in (("eagle", config.arms), ("ngram", config.ngram_arms)):
            if phase == "eagle" and drafter_graphdef is None:
                continue
            per = {}
            for b in self.buckets:
                if b > config.sd_threshold:
                    per[b] = ["plain"]
                else:
                    per[b] = (["plain"] if config.plain_arm else []) + list(arms) or ["plain"]
            self.bandits[phase] = BucketBandit(per, config.epsilon, config.window, seed=config.seed)

    # ------------------------------------------------------------------------------------------ programs

    def _abstract_state(self, bucket: int, replica: Replica, params, drafter_params) -> SpecState:
        """The state of a replica compacted to ``bucket`` rows (its text table stays at the top bucket's)."""
        top = self.top_bucket
        i32 = jnp.int32
        bank = (jax.ShapeDtypeStruct((top, self.cache_len + 1), i32), jax.ShapeDtypeStruct((top,), i32)) \
            if self.store is not None else (None, None)
        st = jax.eval_shape(functools.partial(start_speculative, graphdef=self.graphdef,
                                              drafter_graphdef=self.drafter_graphdef, spec=self.spec,
                                              speculation=SpeculativeSpec(proposer="none"), cache_len=self.cache_len),
                            params, drafter_params, jax.ShapeDtypeStruct((top, 8), i32),
                            jax.ShapeDtypeStruct((top, 8), bool), jax.ShapeDtypeStruct((top,), i32),
                            jax.random.PRNGKey(0), jax.ShapeDtypeStruct((top, self.config.group_sources), i32), *bank)
        if bucket < top:
            st = jax.eval_shape(_take_rows, st, jax.ShapeDtypeStruct((bucket,), i32))
        shard = replica.state_shardings(st)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), st, shard)

    def _pooled(self, pool: ProgramPool, replica: Replica, what: Tuple, build):
        """``pool``'s program ``what`` for the replica's devices: a pool hit, else another local replica's copy
        of it relocated to these devices (only a compiled one: see ``ProgramPool.compiled``), else ``build()``."""
        def key(r: Replica):
            return (tuple(d.id for d in r.mesh.devices.flat), tuple(r.mesh.shape.items())) + what

        def derive():
            for other in self.replicas:
                src = pool.compiled(key(other)) if other.local and other is not replica else None
                if src is not None and other.mesh.devices.shape == replica.mesh.devices.shape:
                    return relocate(src, list(other.mesh.devices.flat), list(replica.mesh.devices.flat))
            return None
        return pool.get(key(replica), build, derive)

    def program(self, replica: Replica, bucket: int, arm: str, params, drafter_params):
        """The compiled chunk for (bucket, arm) on the replica's devices (from the pool)."""
        def build():
            speculation = self.config.speculation.with_arm(arm)
            st = self._abstract_state(bucket, replica, params, drafter_params)
            return _on_mesh(replica, lambda: speculative_chunk.lower(
                params, drafter_params, st, graphdef=self.graphdef, drafter_graphdef=self.drafter_graphdef,
                spec=self.spec, speculation=speculation))
        return self._pooled(self.pool, replica, (bucket, arm, self.drafter_graphdef is not None, self.spec,
                                                 self.cache_len, self.graphdef, self.drafter_graphdef), build)

    def arms_for(self, bucket: int, phase: str) -> List[str]:
        return self.bandits[phase].arms[bucket]

    def precompile(self, params, drafter_params, phases: Sequence[str] = ("eagle", "ngram"),
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
        """Compiles every (bucket, arm) program of the local replicas ahead of time; returns pool stats."""
        wanted = []
        for phase in phases:
            if phase not in self.bandits:
                continue
            for b in self.buckets:
                for arm in self.arms_for(b, phase):
                    wanted.append((b, arm))
        wanted = list(dict.fromkeys(wanted))
        if len(wanted) > self.pool.max_programs:
            raise ConfigError(f"the engine needs {len(wanted)} programs (buckets {self.buckets} x arms) but "
                              f"tlt.max_programs is {self.pool.max_programs}")
        for r in self.replicas:
            if not r.local:
                continue
            p, dp = self._place(r, params, drafter_params)
            for b, arm in wanted:
                if progress is not None:
                    progress(f"compile bucket {b} {arm}")
                self.program(r, b, arm, p, dp)
        return self.pool.stats()

    # ------------------------------------------------------------------------------------------ helpers

    def _place(self, r: Replica, params, drafter_params):
        """The policy on a replica (``Replica.place_policy``) and the drafter, replicated."""
        return (r.place_policy(params),
                to_mesh(drafter_params, r.replicated) if drafter_params is not None else None)

    def _gather_rows(self, x: np.ndarray) -> np.ndarray:
        """[num_processes, ...] of x from every process (one process: x[None])."""
        if self._gather is not None:
            return self._gather(x)
        if jax.process_count() == 1:
            return x[None]
        return allgather(x)

    def _harvest(self, run: _Run, out: Dict[str, np.ndarray]) -> None:
        """The finished rows of a replica's state into ``out`` (by original row index)."""
        rows = harvest(run.state)
        for i, row in enumerate(run.rows):
            if row >= 0 and rows["done"][i] and not out["have"][row]:
                for k in OUT_FIELDS:
                    out[k][row] = rows[k][i]
                out["have"][row] = True

    # ------------------------------------------------------------------------------------------ rollout

    def generate(self, params, prompts: Sequence[Sequence[int]], *, seed: int = 0,
                 drafter: Optional[DrafterInput] = None, max_new: Optional[Sequence[int]] = None) -> RolloutOutput:
        """Runs the batch to completion. ``drafter.trainer``: an object with ``begin(replicas,
        params_by_replica)``, ``step(replica) -> bool`` and ``end() -> dict`` (the drafter's spot trainer), or
        None; ``drafter.proposes`` False keeps the model-free arms drafting (the drafter is not warm yet)."""
        b = len(prompts)
        if b != self.batch_size:
            raise InputError(f"the engine was built for {self.batch_size} rows, got {b}")
        drafter_params = drafter.params if drafter is not None else None
        spot = drafter.trainer if drafter is not None else None
        use_drafter = drafter is not None and drafter.proposes
        phase = "eagle" if (use_drafter and self.drafter_graphdef is not None) else "ngram"
        if self.drafter_graphdef is not None and drafter_params is None:
            raise InputError("an engine built with a drafter needs the drafter's state (drafter=DrafterInput(...))")
        spec = self.spec
        nmax = spec.max_new_tokens
        limits = np.full((b,), nmax, np.int32) if max_new is None else np.asarray(max_new, np.int32)
        longest = max(len(p) for p in prompts)
        if longest + 1 + 16 >= self.cache_len:
            raise InputError(f"a prompt of {longest} tokens leaves no room in the engine's KV cache of "
                             f"{self.cache_len} slots")
        out = {"tokens": np.zeros((b, nmax), np.int32), "logprobs": np.zeros((b, nmax), np.float32),
               "num_tokens": np.zeros((b,), np.int32), "finish": np.zeros((b,), np.int32),
               "accepted": np.zeros((b,), np.int32), "verifies": np.zeros((b,), np.int32),
               "have": np.zeros((b,), bool)}
        n = self.rows_per_replica
        t_start = time.perf_counter()
        runs: List[_Run] = []
        placed = {}
        for r in self.replicas:
            rows = np.arange(r.index * n, (r.index + 1) * n)
            pad = self.top_bucket - n
            run = _Run(r, np.concatenate([rows, -np.ones(pad, np.int64)]), bucket=self.top_bucket, live=n)
            runs.append(run)
            if not r.local:
                continue
            p, dp = self._place(r, params, drafter_params if self.drafter_graphdef is not None else None)
            placed[r.index] = (p, dp)
            sel = [prompts[i] for i in rows] + [prompts[rows[0]]] * pad
            toks, valid = pad_prompts(sel, side="left", multiple=self.prompt_multiple)
            lim = np.concatenate([limits[rows], np.ones(pad, np.int32)])
            sources, bank, bank_len = group_inputs(sel, self.cache_len, self.config.group_sources, self.store)
            # each row's key from the seed and its index in the whole batch, as plain decoding makes it: the
            # answers do not depend on the replica a row runs on (padding rows: indices past the batch)
            ids = np.where(run.rows >= 0, run.rows, b + np.arange(self.top_bucket)).astype(np.int32)
            args = [jax.device_put(x, r.rows(self.top_bucket)) if x is not None else None
                    for x in (toks, valid, lim, sources, bank, bank_len, ids)]
            key = jax.device_put(jax.random.PRNGKey(seed), r.replicated)
            start = self._pooled(
                self.start_pool, r, (toks.shape, dp is None, spec, self.cache_len, self.graphdef,
                                     self.drafter_graphdef, self.store is not None),
                lambda: _on_mesh(r, lambda: start_speculative.lower(
                    p, dp, *args[:3], key, *args[3:], graphdef=self.graphdef, drafter_graphdef=self.drafter_graphdef,
                    spec=spec, speculation=SpeculativeSpec(proposer="none"), cache_len=self.cache_len)))
            run.state = start(p, dp, *args[:3], key, *args[3:])
            run.state = jax.device_put(run.state, r.state_shardings(run.state))
        counters = np.zeros((len(runs), 3), np.float64)  # live rows, tokens committed by the chunk, seconds
        for run in runs:
            if run.replica.local:
                done = np.asarray(run.state.done)
                run.num_host = np.asarray(run.state.num_tokens)
                counters[run.replica.index, 0] = int((~done & (run.rows >= 0)).sum())
        counters = self._merge(counters)
        t_prefill = time.perf_counter() - t_start
        if spot is not None:
            spot.begin(self.replicas, {i: placed[i][0] for i in placed})
        decisions: List[Tuple] = []
        # per chunk and replica: bucket, arm, the replica's own seconds and tokens, the merged span, live rows
        timeline: List[Dict[str, Any]] = []
        bandit = self.bandits[phase]
        chunk = 0
        spot_steps = np.zeros(len(runs), np.int64)
        while True:
            for run in runs:
                run.live = int(counters[run.replica.index, 0])
                if run.live == 0 and run.finished_at is None:
                    run.finished_at = time.perf_counter()
            if all(run.live == 0 for run in runs):
                break
            # 1. decide (every process, every replica, same inputs -> same decisions)
            plan = []
            for run in runs:
                i = run.replica.index
                if run.live > 0:
                    bucket = next_pow2(run.live) if self.config.compact else run.bucket
                    bucket = min(bucket, run.bucket)
                    arm = "plain" if bucket > self.config.sd_threshold else bandit.choose(bucket)
                    plan.append((i, "rollout", bucket, arm))
                elif spot is not None:
                    plan.append((i, "drafter", 0, ""))
            decisions.extend((chunk,) + p for p in plan)
            t_chunk = time.perf_counter() - t_start
            live_before = {run.replica.index: run.live for run in runs}
            # 2. dispatch
            for i, action, bucket, arm in plan:
                run = runs[i]
                if not run.replica.local:
                    continue
                if action == "drafter":
                    if spot.step(i):
                        spot_steps[i] += 1
                    continue
                if bucket < run.bucket:
                    self._harvest(run, out)
                    done = np.asarray(run.state.done)
                    keep = np.nonzero(~done & (run.rows >= 0))[0]
                    fill = np.nonzero(done)[0][0]
                    idx = np.concatenate([keep, np.full(bucket - len(keep), fill)]).astype(np.int32)
                    st = _take_rows(run.state, jnp.asarray(idx))
                    run.state = jax.device_put(st, run.replica.state_shardings(st))
                    run.rows = np.concatenate([run.rows[keep], -np.ones(bucket - len(keep), np.int64)])
                    run.num_host = run.num_host[idx]
                    run.bucket = bucket
                p, dp = placed[i]
                prog = self.program(run.replica, bucket, arm, p, dp)
                run.t_dispatch = time.perf_counter()
                run.state = prog(p, dp, run.state)
            # 3. gather counters
            counters = np.zeros((len(runs), 3), np.float64)
            for i, action, bucket, arm in plan:
                run = runs[i]
                if action != "rollout" or not run.replica.local:
                    continue
                done = np.asarray(run.state.done)  # waits for this replica's chunk
                secs = time.perf_counter() - run.t_dispatch
                num = np.asarray(run.state.num_tokens)
                real = run.rows >= 0
                gained = int(num[real].sum() - run.num_host[real].sum())
                run.num_host = num
                counters[i] = (int((~done & real).sum()), gained, secs)
            for run in runs:  # finished replicas keep reporting zero live rows
                if run.replica.local and run.live == 0:
                    counters[run.replica.index] = (0, 0, 0.0)
            counters = self._merge(counters)
            t_merged = time.perf_counter() - t_start
            for i, action, bucket, arm in plan:
                if action != "rollout":
                    continue
                gained, secs = counters[i, 1], counters[i, 2]
                reward = gained / secs if secs > 0 else float("nan")
                if bucket <= self.config.sd_threshold:
                    bandit.update(bucket, arm, reward)
                # every replica waits for the chunk's counters: a chunk spans [t_chunk, t_merged] for all
                timeline.append({"chunk": chunk, "replica": i, "bucket": bucket, "arm": arm, "t_start": t_chunk,
                                 "t_end": t_merged, "secs": float(secs), "live_before": live_before[i],
                                 "live_after": int(counters[i, 0]), "tokens": int(gained)})
            chunk += 1
        t_end = time.perf_counter()
        for run in runs:
            if run.replica.local:
                self._harvest(run, out)
        spot_metrics = spot.end() if spot is not None else {}
        out = self._merge_results(out)
        if self.store is not None:
            self.store.record(prompts, [out["tokens"][i, :out["num_tokens"][i]] for i in range(b)])
        idle = [(t_end - run.finished_at) * len(run.replica.devices) for run in runs if run.finished_at is not None]
        stats = {"phase": phase, "chunks": chunk, "rollout_s": t_end - t_start,
                 "idle_device_s": float(sum(idle)), "spot_steps": int(self._merge_sum(spot_steps).sum()),
                 "arm_chunks": _count_arms(timeline), **_arm_rates(timeline), "timeline": timeline,
                 **{f"pool_{k}": v for k, v in self.pool.stats().items()},
                 **spot_metrics}
        return output_from_rows(out, prefill_s=t_prefill, decode_s=t_end - t_start - t_prefill, num_chunks=chunk,
                                stats=stats, decisions=decisions)

    # ------------------------------------------------------------------------------------------ gathering

    def _merge(self, counters: np.ndarray) -> np.ndarray:
        """Every replica's counters as reported by the process that runs it."""
        g = self._gather_rows(counters)  # [P, R, 3]
        if g.shape[0] == 1:
            return g[0]
        owner = np.array([self.replicas[i].devices[0].process_index for i in range(len(self.replicas))])
        return g[owner, np.arange(len(self.replicas))]

    def _merge_sum(self, x: np.ndarray) -> np.ndarray:
        return self._gather_rows(x).sum(0)

    def _merge_results(self, out: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if jax.process_count() == 1 and self._gather is None:
            return out
        have = self._gather_rows(out["have"])  # [P, B]
        merged = {}
        for k, v in out.items():
            if k == "have":
                continue
            g = self._gather_rows(v)
            owner = np.argmax(have, axis=0)
            merged[k] = g[owner, np.arange(v.shape[0])]
        merged["have"] = have.any(0)
        return merged


def _arm_rates(timeline) -> Dict[str, Any]:
    """Where speculation ran and what it gained: the tokens per second of each (bucket, arm) over its chunks,
    and the share of the chunks' seconds spent in speculative arms (not ``plain``)."""
    secs: Dict[str, float] = {}
    toks: Dict[str, float] = {}
    for c in timeline:
        k = f"{c['bucket']}:{c['arm']}"
        secs[k] = secs.get(k, 0.0) + c["secs"]
        toks[k] = toks.get(k, 0.0) + c["tokens"]
    total = sum(secs.values())
    spec = sum(v for k, v in secs.items() if not k.endswith(":plain"))
    return {"arm_tok_s": {k: toks[k] / secs[k] for k in secs if secs[k] > 0},
            "spec_time_share": spec / total if total > 0 else 0.0}


def _count_arms(timeline) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for c in timeline:
        k = f"{c['bucket']}:{c['arm']}"
        counts[k] = counts.get(k, 0) + 1
    return counts
