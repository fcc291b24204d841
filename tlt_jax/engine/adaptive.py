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
   and arm) and drafter step without waiting: replicas on different devices run concurrently.
3. **Gather** the small counters (live rows, committed tokens, chunk seconds) of every replica from every
   process, update the bandits in replica order, and go on until no replica has live rows.

Speculation keeps one state type (``SpecState``) whatever the arm: plain steps are speculative steps with no
drafts, and the drafter's cache follows every commit, so switching speculation on, changing the strategy and
compacting the batch cost nothing but a row gather. The learned drafter proposes once it is warm; until then
the model-free n-gram proposer serves.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.engine.bandit import BucketBandit
from tlt_jax.engine.pool import ProgramPool, relocate
from tlt_jax.errors import ConfigError, InputError
from tlt_jax.rollout.decode import FINISH_NAMES, RolloutResult, RolloutSpec, pad_prompts
from tlt_jax.rollout.speculative import (SpecState, SpeculativeSpec, accept_length, speculative_chunk,
                                         start_speculative)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
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
    ngram_max: int = 3
    ngram_min: int = 1
    seed: int = 0

    def __post_init__(self):
        if int(self.replicas) < 1:
            raise ConfigError(f"tlt.replicas must be >= 1, got {self.replicas}")
        if int(self.replica_tensor) < 1:
            raise ConfigError(f"tlt.replica_tensor must be >= 1, got {self.replica_tensor}")
        if int(self.sd_threshold) < 0:
            raise ConfigError(f"tlt.sd_threshold must be >= 0 (0: never speculate), got {self.sd_threshold}")
        for name, arms in (("tlt.arms", self.arms), ("tlt.ngram_arms", self.ngram_arms)):
            for a in arms:
                s = SpeculativeSpec.from_arm(a, self.ngram_max, self.ngram_min)
                if (name == "tlt.arms") != (s.proposer == "eagle"):
                    raise ConfigError(f"{name}: {a!r} is not a {'learned-drafter' if name == 'tlt.arms' else 'n-gram'}"
                                      f" strategy")
        if not self.plain_arm and (not self.arms or not self.ngram_arms):
            raise ConfigError("without the plain arm, tlt.arms and tlt.ngram_arms must both be non-empty")

    @staticmethod
    def from_config(config) -> "EngineConfig":
        t = config.tlt
        sp = config.speculative
        return EngineConfig(replicas=int(t.replicas), replica_tensor=int(t.replica_tensor),
                            sd_threshold=int(t.sd_threshold), arms=tuple(t.arms), ngram_arms=tuple(t.ngram_arms),
                            plain_arm=bool(t.plain_arm), epsilon=float(t.epsilon),
                            window=int(t.window), compact=bool(t.compact), max_programs=int(t.max_programs),
                            ngram_max=int(sp.ngram_max), ngram_min=int(sp.ngram_min), seed=int(config.seed))


class Replica(NamedTuple):
    index: int
    devices: Tuple[jax.Device, ...]
    mesh: Mesh  # axes ("data", "tensor"): rows over data, the policy's heads / FFN / vocabulary over tensor
    local: bool  # every device of the replica belongs to this process

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape["data"])


def make_replicas(num: int, devices: Optional[Sequence[jax.Device]] = None, tensor: int = 1) -> List[Replica]:
    """``num`` disjoint sub-meshes of the devices (all of them: ``jax.devices()``), in device order, each a
    (data, tensor) mesh with ``tensor`` devices per model copy.

    With fewer devices than replicas, replicas share devices round-robin (one CPU device, say): the engine
    still splits the batch and trains on finished replicas, but they run on the same hardware.
    """
    devices = list(jax.devices() if devices is None else devices)
    num, tensor = int(num), int(tensor)
    if num < 1:
        raise ConfigError(f"need at least one rollout replica, got {num}")
    if len(devices) >= num:
        if len(devices) % num:
            raise ConfigError(f"{num} rollout replicas do not split {len(devices)} devices evenly")
        k = len(devices) // num
        groups = [devices[i * k:(i + 1) * k] for i in range(num)]
    else:
        groups = [[devices[i % len(devices)]] for i in range(num)]
    if len(groups[0]) % tensor:
        raise ConfigError(f"tlt.replica_tensor={tensor} does not divide a replica's {len(groups[0])} device(s) "
                          f"({len(devices)} devices, {num} replicas)")
    me = jax.process_index()
    return [Replica(i, tuple(g), Mesh(np.asarray(g).reshape(len(g) // tensor, tensor), ("data", "tensor")),
                    all(d.process_index == me for d in g))
            for i, g in enumerate(groups)]


def _shardings(tree, mesh: Mesh, batch: int):
    """Replica layout: leaves whose leading axis is the batch are split over the replica's data axis when it
    divides, KV caches ([B, KV heads, S, D]) also over the tensor axis by head (as tensor-parallel attention
    leaves them), everything else (the RNG key, ...) is replicated."""
    n, t = int(mesh.shape["data"]), int(mesh.shape["tensor"])

    def one(path, x):
        name = jax.tree_util.keystr(path)
        split = (x.ndim >= 1 and x.shape[0] == batch and batch % n == 0 and "rng" not in name)
        heads = "tensor" if (t > 1 and x.ndim == 4 and "cache" in name and x.shape[1] % t == 0) else None
        spec = ("data" if split and n > 1 else None, heads)[:max(1, x.ndim)] if x.ndim else ()
        return NamedSharding(mesh, P(*spec))
    return jax.tree_util.tree_map_with_path(one, tree)


@jax.jit
def _take_rows(state: SpecState, idx: jax.Array) -> SpecState:
    """The rows ``idx`` of every batch leaf (compaction)."""
    b = state.done.shape[0]

    def take(path, x):
        if "rng" in jax.tree_util.keystr(path) or x.ndim == 0 or x.shape[0] != b:
            return x
        return jnp.take(x, idx, axis=0)
    return jax.tree_util.tree_map_with_path(take, state)


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


class EngineResult(NamedTuple):
    result: RolloutResult
    accepted: np.ndarray  # [B]
    verifies: np.ndarray  # [B]
    stats: Dict[str, Any]
    decisions: List[Tuple]  # (chunk, replica, action, bucket, arm): identical on every process

    @property
    def accept_len(self) -> float:
        return accept_length(self.result.lengths, self.verifies)


class AdaptiveEngine:
    """Runs rollouts of ``graphdef`` models; keeps its bandits and compiled programs across rollouts."""

    def __init__(self, graphdef, spec: RolloutSpec, ecfg: EngineConfig, *, batch_size: int, cache_len: int,
                 dgraphdef=None, devices: Optional[Sequence[jax.Device]] = None, pool: Optional[ProgramPool] = None,
                 gather: Optional[Callable[[np.ndarray], np.ndarray]] = None, prompt_multiple: int = 32):
        self.graphdef, self.dgraphdef, self.spec, self.ecfg = graphdef, dgraphdef, spec, ecfg
        self.cache_len = int(cache_len)
        self.prompt_multiple = int(prompt_multiple)  # prompts are padded to a multiple: few prefill programs
        self.replicas = make_replicas(ecfg.replicas, devices, ecfg.replica_tensor)
        if batch_size % ecfg.replicas:
            raise ConfigError(f"a rollout batch of {batch_size} rows does not split over {ecfg.replicas} replicas")
        self.batch_size = int(batch_size)
        self.rows_per_replica = batch_size // ecfg.replicas
        self.top_bucket = next_pow2(self.rows_per_replica)
        self.buckets = [self.top_bucket >> i for i in range(self.top_bucket.bit_length())]
        self.pool = pool if pool is not None else ProgramPool(ecfg.max_programs)
        self.start_pool = ProgramPool(8)  # prefill programs, one per prompt width (kept apart from the chunks)
        self._gather = gather
        self.bandits: Dict[str, BucketBandit] = {}
        for phase, arms in (("eagle", ecfg.arms), ("ngram", ecfg.ngram_arms)):
            if phase == "eagle" and dgraphdef is None:
                continue
            per = {}
            for b in self.buckets:
                if b > ecfg.sd_threshold:
                    per[b] = ["plain"]
                else:
                    per[b] = (["plain"] if ecfg.plain_arm else []) + list(arms) or ["plain"]
            self.bandits[phase] = BucketBandit(per, ecfg.epsilon, ecfg.window, seed=ecfg.seed)

    # ------------------------------------------------------------------------------------------ programs

    def _abstract_state(self, bucket: int, replica: Replica, params, dparams) -> SpecState:
        toks = jax.ShapeDtypeStruct((bucket, 8), jnp.int32)
        st = jax.eval_shape(functools.partial(start_speculative, graphdef=self.graphdef, dgraphdef=self.dgraphdef,
                                              spec=self.spec, sspec=SpeculativeSpec(proposer="none"),
                                              cache_len=self.cache_len),
                            params, dparams, toks, jax.ShapeDtypeStruct((bucket, 8), bool),
                            jax.ShapeDtypeStruct((bucket,), jnp.int32), jax.random.PRNGKey(0))
        shard = _shardings(st, replica.mesh, bucket)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), st, shard)

    def _pooled(self, pool: ProgramPool, replica: Replica, what: Tuple, build):
        """``pool``'s program ``what`` for the replica's devices: a pool hit, else another local replica's copy
        of it relocated to these devices, else ``build()``."""
        def key(r: Replica):
            return (tuple(d.id for d in r.mesh.devices.flat), tuple(r.mesh.shape.items())) + what

        def derive():
            for other in self.replicas:
                src = pool.peek(key(other)) if other.local and other is not replica else None
                if src is not None and other.mesh.devices.shape == replica.mesh.devices.shape:
                    return relocate(src, list(other.mesh.devices.flat), list(replica.mesh.devices.flat))
            return None
        return pool.get(key(replica), build, derive)

    def program(self, replica: Replica, bucket: int, arm: str, params, dparams):
        """The compiled chunk for (bucket, arm) on the replica's devices (from the pool)."""
        def build():
            sspec = SpeculativeSpec.from_arm(arm, self.ecfg.ngram_max, self.ecfg.ngram_min)
            st = self._abstract_state(bucket, replica, params, dparams)
            return speculative_chunk.lower(params, dparams, st, graphdef=self.graphdef, dgraphdef=self.dgraphdef,
                                           spec=self.spec, sspec=sspec).compile()
        return self._pooled(self.pool, replica, (bucket, arm, self.dgraphdef is not None, self.spec, self.cache_len,
                                                 self.graphdef, self.dgraphdef), build)

    def arms_for(self, bucket: int, phase: str) -> List[str]:
        return self.bandits[phase].arms[bucket]

    def precompile(self, params, dparams, phases: Sequence[str] = ("eagle", "ngram"),
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
            p, dp = self._place(r, params, dparams)
            for b, arm in wanted:
                if progress is not None:
                    progress(f"compile bucket {b} {arm}")
                self.program(r, b, arm, p, dp)
        return self.pool.stats()

    # ------------------------------------------------------------------------------------------ helpers

    def _place(self, r: Replica, params, dparams):
        """The policy (possibly laid out over the whole training mesh) on a replica, by the sharding rules over
        its tensor axis (whole on each device without one), and the drafter, replicated."""
        from tlt_jax.parallel.sharding import to_mesh, tree_shardings

        rep = NamedSharding(r.mesh, P())
        return (to_mesh(params, tree_shardings(params, r.mesh)),
                to_mesh(dparams, rep) if dparams is not None else None)

    def _gather_rows(self, x: np.ndarray) -> np.ndarray:
        """[num_processes, ...] of x from every process (one process: x[None])."""
        if self._gather is not None:
            return self._gather(x)
        if jax.process_count() == 1:
            return x[None]
        from tlt_jax.parallel.multihost import allgather

        return allgather(x)

    def _harvest(self, run: _Run, out: Dict[str, np.ndarray]) -> None:
        st = run.state
        done, num, toks, lps, fin, acc, ver = jax.device_get(
            (st.done, st.num_tokens, st.tokens, st.logprobs, st.finish, st.accepted, st.verifies))
        for i, row in enumerate(run.rows):
            if row >= 0 and done[i] and not out["have"][row]:
                out["tokens"][row] = toks[i]
                out["logprobs"][row] = lps[i]
                out["num"][row] = num[i]
                out["finish"][row] = fin[i]
                out["accepted"][row] = acc[i]
                out["verifies"][row] = ver[i]
                out["have"][row] = True

    # ------------------------------------------------------------------------------------------ rollout

    def rollout(self, params, dparams, prompts: Sequence[Sequence[int]], *, seed: int, use_drafter: bool = True,
                spot=None, max_new: Optional[Sequence[int]] = None) -> EngineResult:
        """Runs the batch to completion. ``spot``: an object with ``begin(replicas, params_by_replica)``,
        ``step(replica) -> bool`` and ``end() -> dict`` (the drafter's spot trainer), or None."""
        b = len(prompts)
        if b != self.batch_size:
            raise InputError(f"the engine was built for {self.batch_size} rows, got {b}")
        phase = "eagle" if (use_drafter and self.dgraphdef is not None) else "ngram"
        if phase == "eagle" and dparams is None:
            raise InputError("the learned drafter phase needs the drafter's state")
        spec = self.spec
        nmax = spec.max_new_tokens
        limits = np.full((b,), nmax, np.int32) if max_new is None else np.asarray(max_new, np.int32)
        longest = max(len(p) for p in prompts)
        if longest + 1 + 16 >= self.cache_len:
            raise InputError(f"a prompt of {longest} tokens leaves no room in the engine's KV cache of "
                             f"{self.cache_len} slots")
        out = {"tokens": np.zeros((b, nmax), np.int32), "logprobs": np.zeros((b, nmax), np.float32),
               "num": np.zeros((b,), np.int32), "finish": np.zeros((b,), np.int32),
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
            p, dp = self._place(r, params, dparams if self.dgraphdef is not None else None)
            placed[r.index] = (p, dp)
            sel = [prompts[i] for i in rows] + [prompts[rows[0]]] * pad
            toks, valid = pad_prompts(sel, side="left", multiple=self.prompt_multiple)
            lim = np.concatenate([limits[rows], np.ones(pad, np.int32)])
            shard = NamedSharding(r.mesh, P("data") if self.top_bucket % r.data_size == 0 else P())
            args = [jax.device_put(x, shard) for x in (toks, valid, lim)]
            key = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), r.index), NamedSharding(r.mesh, P()))
            start = self._pooled(
                self.start_pool, r, (toks.shape, dp is None, spec, self.cache_len, self.graphdef, self.dgraphdef),
                lambda: start_speculative.lower(p, dp, *args, key, graphdef=self.graphdef, dgraphdef=self.dgraphdef,
                                                spec=spec, sspec=SpeculativeSpec(proposer="none"),
                                                cache_len=self.cache_len).compile())
            run.state = start(p, dp, *args, key)
            run.state = jax.device_put(run.state, _shardings(run.state, r.mesh, self.top_bucket))
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
        timeline: List[Tuple] = []
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
                    bucket = next_pow2(run.live) if self.ecfg.compact else run.bucket
                    bucket = min(bucket, run.bucket)
                    arm = "plain" if bucket > self.ecfg.sd_threshold else bandit.choose(bucket)
                    plan.append((i, "rollout", bucket, arm))
                elif spot is not None:
                    plan.append((i, "drafter", 0, ""))
            decisions.extend((chunk,) + p for p in plan)
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
                    run.state = jax.device_put(st, _shardings(st, run.replica.mesh, bucket))
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
            for i, action, bucket, arm in plan:
                if action != "rollout":
                    continue
                gained, secs = counters[i, 1], counters[i, 2]
                reward = gained / secs if secs > 0 else float("nan")
                if bucket <= self.ecfg.sd_threshold:
                    bandit.update(bucket, arm, reward)
                timeline.append((chunk, i, bucket, arm, float(secs), float(gained)))
            chunk += 1
        t_end = time.perf_counter()
        for run in runs:
            if run.replica.local:
                self._harvest(run, out)
        spot_metrics = spot.end() if spot is not None else {}
        out = self._merge_results(out)
        lengths = out["num"]
        result = RolloutResult(tokens=[out["tokens"][i, :lengths[i]].tolist() for i in range(b)],
                               logprobs=[out["logprobs"][i, :lengths[i]] for i in range(b)], lengths=lengths,
                               finish_reasons=[FINISH_NAMES[int(f)] for f in out["finish"]],
                               prefill_s=t_prefill, decode_s=t_end - t_start - t_prefill, num_chunks=chunk)
        idle = [(t_end - run.finished_at) * len(run.replica.devices) for run in runs if run.finished_at is not None]
        stats = {"phase": phase, "chunks": chunk, "rollout_s": t_end - t_start,
                 "idle_device_s": float(sum(idle)), "spot_steps": int(self._merge_sum(spot_steps).sum()),
                 "arm_chunks": _count_arms(timeline), **{f"pool_{k}": v for k, v in self.pool.stats().items()},
                 **spot_metrics}
        return EngineResult(result, out["accepted"], out["verifies"], stats, decisions)

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


def _count_arms(timeline) -> Dict[str, int]:
    c: Dict[str, int] = {}
    for _, _, bucket, arm, _, _ in timeline:
        k = f"{bucket}:{arm}"
        c[k] = c.get(k, 0) + 1
    return c
