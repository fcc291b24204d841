"""The rollout interface: one protocol, one result type, one host loop.

Every way of producing a batch of answers (plain decoding, fixed-strategy speculation, the adaptive engine in
``tlt_jax.engine``) is a :class:`Rollout`::

    out = rollout.generate(params, prompts, seed=0)            # -> RolloutOutput
    out = rollout.generate(params, prompts, seed=0, drafter=DrafterInput(drafter_params))

and returns a :class:`RolloutOutput`, whose speculation statistics (``accepted``, ``verifies``, ``accept_len``)
are None for plain decoding. The host side of a rollout (dispatch a chunk, read the done flags, harvest the
finished rows, name the finish reasons) is written once here: :func:`run_until_done` and :func:`harvest` serve
the two fixed rollouts below, and the adaptive engine's own decision loop uses :func:`harvest` and
:func:`output_from_rows` too.

On a mesh (``mesh=``) the prompt batch and the state are laid out by ``parallel.sharding.STATE_RULES`` (rows over
the data and fsdp axes, KV heads over tensor) and the programs are compiled with those shardings as explicit
inputs and outputs; the parameters are placed by ``PARAM_RULES`` (a no-op when they are already there).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.core.errors import InputError
from tlt_jax.parallel.sharding import STATE_RULES, batch_sharding, to_global, to_host, to_mesh, tree_shardings
from tlt_jax.rollout import decode as plain_programs
from tlt_jax.rollout import speculative as speculative_programs
from tlt_jax.rollout.decode import FINISH_NAMES, PreparedBatch, RolloutSpec, prepare_batch
from tlt_jax.rollout.speculative import SpeculativeSpec, accept_length, check_drafter
from tlt_jax.rollout.suffix import GroupStore, group_inputs


class DrafterInput(NamedTuple):
    """What a rollout gets of the learned drafter."""

    params: Any  # the drafter's state (``nnx.split(drafter)[1]``)
    proposes: bool = True  # False: not warm yet; it follows the commits while the model-free proposer drafts
    trainer: Any = None  # trains the drafter on replicas whose rows are done (used by the adaptive engine)


@dataclasses.dataclass
class RolloutOutput:
    tokens: List[List[int]]  # answer tokens per row (stop token included)
    logprobs: List[np.ndarray]  # per-token log-probs under the sampling distribution
    lengths: np.ndarray  # [B]
    finish_reasons: List[str]  # 'stop', 'length' or 'cache'
    prefill_s: float
    decode_s: float
    num_chunks: int
    accepted: Optional[np.ndarray] = None  # [B] accepted draft tokens (speculation only)
    verifies: Optional[np.ndarray] = None  # [B] target forwards (speculation only)
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)  # engine statistics (arms, pool, spot, ...)
    decisions: List[Tuple] = dataclasses.field(default_factory=list)  # engine: (chunk, replica, action, bucket, arm)

    @property
    def accept_len(self) -> Optional[float]:
        """Committed tokens per target forward; None for plain decoding."""
        return None if self.verifies is None else accept_length(self.lengths, self.verifies)


class Rollout(Protocol):
    def generate(self, params, prompts: Sequence[Sequence[int]], *, seed: int = 0,
                 drafter: Optional[DrafterInput] = None, max_new: Optional[Sequence[int]] = None
                 ) -> RolloutOutput:
        """Answers ``prompts`` (token lists) with the policy ``params`` to completion."""


# ------------------------------------------------------------------------------------------------ host loop

ROW_FIELDS = ("done", "num_tokens", "tokens", "logprobs", "finish")
SPECULATION_FIELDS = ("accepted", "verifies")


def harvest(state) -> Dict[str, np.ndarray]:
    """The per-row results of a rollout state on the host (an all-gather when it spans processes)."""
    names = ROW_FIELDS + tuple(f for f in SPECULATION_FIELDS if hasattr(state, f))
    arrays = [getattr(state, f) for f in names]
    if all(x.is_fully_addressable for x in arrays):
        return dict(zip(names, jax.device_get(arrays)))  # one transfer
    return {f: to_host(x) for f, x in zip(names, arrays)}


def output_from_rows(rows: Dict[str, np.ndarray], *, prefill_s: float, decode_s: float, num_chunks: int,
                     stats: Optional[Dict[str, Any]] = None, decisions: Optional[List[Tuple]] = None
                     ) -> RolloutOutput:
    """A RolloutOutput from harvested rows (``num_tokens``, ``tokens``, ``logprobs``, ``finish`` and, for
    speculation, ``accepted`` and ``verifies``)."""
    num = np.asarray(rows["num_tokens"])
    b = len(num)
    return RolloutOutput(tokens=[rows["tokens"][i, :num[i]].tolist() for i in range(b)],
                         logprobs=[rows["logprobs"][i, :num[i]] for i in range(b)], lengths=num,
                         finish_reasons=[FINISH_NAMES[int(f)] for f in rows["finish"]], prefill_s=prefill_s,
                         decode_s=decode_s, num_chunks=num_chunks, accepted=rows.get("accepted"),
                         verifies=rows.get("verifies"), stats=dict(stats or {}), decisions=list(decisions or []))


def run_until_done(start: Callable[[], Any], chunk: Callable[[Any], Any],
                   on_chunk: Optional[Callable[[Any], None]] = None) -> RolloutOutput:
    """The host loop of a fixed rollout: the start program, then chunks until every row is done (the host reads
    only the done flags in between), then one harvest."""
    t0 = time.perf_counter()
    state = start()
    done = to_host(state.done)
    t1 = time.perf_counter()
    chunks = 0
    while not done.all():
        state = chunk(state)
        chunks += 1
        done = to_host(state.done)
        if on_chunk is not None:
            on_chunk(state)
    t2 = time.perf_counter()
    return output_from_rows(harvest(state), prefill_s=t1 - t0, decode_s=t2 - t1, num_chunks=chunks)


# ------------------------------------------------------------------------------------------------ placement


class _Programs:
    """A start and a chunk program, compiled for one device (the module-level jitted functions) or for a mesh
    with explicit input and output shardings (state laid out by ``STATE_RULES``)."""

    def __init__(self, start_fn, chunk_fn, start_jit, chunk_jit, start_static, chunk_static):
        self.start_fn, self.chunk_fn = start_fn, chunk_fn
        self.start_jit, self.chunk_jit = start_jit, chunk_jit
        self.start_static, self.chunk_static = start_static, chunk_static
        self._compiled: Dict[Any, Tuple[Callable, Callable]] = {}

    def on(self, mesh: Optional[Mesh], models: Tuple, inputs, static: Dict[str, Any]):
        """(start, chunk) callables for ``mesh`` (None: one device), taking ``models`` (the policy's parameters,
        and the drafter's for speculation), then the start's ``inputs`` or the chunk's state."""
        start_kw = {k: static[k] for k in self.start_static}
        chunk_kw = {k: static[k] for k in self.chunk_static}
        if mesh is None:
            return (lambda *a: self.start_jit(*a, **start_kw)), (lambda *a: self.chunk_jit(*a, **chunk_kw))
        key = (mesh, tuple(None if x is None else (x.shape, x.dtype) for x in inputs),
               tuple(sorted(start_kw.items(), key=str)))
        if key not in self._compiled:
            lead = tuple(models)
            abstract = jax.eval_shape(lambda *a: self.start_fn(*a, **start_kw), *lead, *inputs)
            state_sh = tree_shardings(abstract, mesh, STATE_RULES)
            param_sh = jax.tree.map(lambda x: x.sharding, lead)
            in_sh = tuple(None if x is None else x.sharding for x in inputs)
            start = jax.jit(lambda *a: self.start_fn(*a, **start_kw), in_shardings=param_sh + in_sh,
                            out_shardings=state_sh)
            chunk = jax.jit(lambda *a: self.chunk_fn(*a, **chunk_kw), in_shardings=param_sh + (state_sh,),
                            out_shardings=state_sh, donate_argnums=(len(lead),))
            self._compiled[key] = (_on_mesh(mesh, start), _on_mesh(mesh, chunk))
        return self._compiled[key]


def _on_mesh(mesh: Mesh, fn):
    """``fn`` called (and so traced) under ``mesh``: the attention kernels run per shard of it."""
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return call


PLAIN_PROGRAMS = _Programs(plain_programs.rollout_start, plain_programs.rollout_chunk, plain_programs.start_rollout,
                           plain_programs.decode_chunk, plain_programs.START_STATIC, plain_programs.CHUNK_STATIC)
SPECULATIVE_PROGRAMS = _Programs(speculative_programs.speculative_start, speculative_programs.speculative_steps,
                                 speculative_programs.start_speculative, speculative_programs.speculative_chunk,
                                 speculative_programs.START_STATIC, speculative_programs.CHUNK_STATIC)


def _inputs(batch: PreparedBatch, seed: int, mesh: Optional[Mesh], group: Tuple = ()):
    """Prompt tokens, valid flags, per-row limits, the RNG key and the ``group`` arrays (sources, bank and bank
    lengths; None where absent), split over the mesh's batch axes."""
    key = jax.random.PRNGKey(seed)
    if mesh is None:
        place = jax.numpy.asarray
        key_in = key
    else:
        def place(x):
            return to_global(x, batch_sharding(mesh, x.shape))
        key_in = to_global(np.asarray(key), NamedSharding(mesh, P()))
    host = tuple(place(x) for x in (batch.tokens, batch.valid, batch.limits))
    return host + (key_in,) + tuple(None if x is None else place(x) for x in group)


class _FixedRollout:
    def __init__(self, graphdef, spec: RolloutSpec, *, context_len: int = 0, cache_len: Optional[int] = None,
                 mesh: Optional[Mesh] = None, pad_side: str = "left"):
        self.graphdef, self.spec = graphdef, spec
        self.context_len, self.cache_len, self.mesh, self.pad_side = int(context_len), cache_len, mesh, pad_side

    def _prepare(self, prompts, max_new) -> PreparedBatch:
        return prepare_batch(prompts, self.spec, context_len=self.context_len, cache_len=self.cache_len,
                             max_new=max_new, pad_side=self.pad_side)

    def _place_params(self, params):
        """The policy laid out on the mesh by the sharding rules (as it is when it already is: no transfer)."""
        if self.mesh is None:
            return params
        shardings = tree_shardings(params, self.mesh)
        if all(getattr(x, "sharding", None) == s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings))):
            return params
        return to_mesh(params, shardings)


class PlainRollout(_FixedRollout):
    """Plain decoding: one token per row and step, chunks of ``spec.chunk_steps`` steps."""

    def generate(self, params, prompts, *, seed: int = 0, drafter: Optional[DrafterInput] = None,
                 max_new=None, on_chunk=None) -> RolloutOutput:
        batch = self._prepare(prompts, max_new)
        params = self._place_params(params)
        inputs = _inputs(batch, seed, self.mesh)
        start, chunk = PLAIN_PROGRAMS.on(self.mesh, (params,), inputs, dict(
            graphdef=self.graphdef, spec=self.spec, cache_len=batch.cache_len))
        return run_until_done(lambda: start(params, *inputs), lambda st: chunk(params, st), on_chunk)


class SpeculativeRollout(_FixedRollout):
    """Speculation with one strategy for the whole batch, all the way (``SpeculativeSpec``): the learned drafter
    (``drafter_graphdef`` and ``DrafterInput.params`` at each call), the model-free n-gram or group proposer, or
    the hybrid.

    ``group_sources``: the texts a row drafts from (``suffix.group_inputs``); ``store``: a ``GroupStore`` of
    earlier answers by prompt, which every call reads and then records its answers in.
    """

    def __init__(self, graphdef, spec: RolloutSpec, speculation: SpeculativeSpec, *, model_cfg,
                 drafter_graphdef=None, drafter_cfg=None, cache_len: Optional[int] = None,
                 mesh: Optional[Mesh] = None, pad_side: str = "left", group_sources: int = 16,
                 store: Optional[GroupStore] = None):
        super().__init__(graphdef, spec, context_len=model_cfg.max_position_embeddings, cache_len=cache_len,
                         mesh=mesh, pad_side=pad_side)
        check_drafter(model_cfg, drafter_cfg, speculation)
        self.speculation = speculation
        self.drafter_graphdef = drafter_graphdef if speculation.learned else None
        self.group_sources, self.store = int(group_sources), store

    def generate(self, params, prompts, *, seed: int = 0, drafter: Optional[DrafterInput] = None,
                 max_new=None, on_chunk=None) -> RolloutOutput:
        sp = self.speculation
        if self.drafter_graphdef is not None and (drafter is None or drafter.params is None):
            raise InputError("the EAGLE proposer needs the drafter's parameters (drafter=DrafterInput(...))")
        batch = self._prepare(prompts, max_new)
        if sp.strategy.num_verify + batch.longest > batch.cache_len:
            raise InputError(f"strategy {sp.strategy.name} verifies {sp.strategy.num_verify} tokens per step, "
                             f"which with a {batch.longest}-token prompt does not fit a KV cache of "
                             f"{batch.cache_len} slots")
        params = self._place_params(params)
        drafter_params = None
        if self.drafter_graphdef is not None:
            drafter_params = drafter.params if self.mesh is None else to_mesh(
                drafter.params, NamedSharding(self.mesh, P()))
        group = group_inputs(prompts, batch.cache_len, self.group_sources, self.store)
        inputs = _inputs(batch, seed, self.mesh, group)
        start, chunk = SPECULATIVE_PROGRAMS.on(self.mesh, (params, drafter_params), inputs, dict(
            graphdef=self.graphdef, drafter_graphdef=self.drafter_graphdef, spec=self.spec, speculation=sp,
            cache_len=batch.cache_len))
        out = run_until_done(lambda: start(params, drafter_params, *inputs),
                             lambda st: chunk(params, drafter_params, st), on_chunk)
        if self.store is not None:
            self.store.record(prompts, out.tokens)
        return out


def fixed_rollout(graphdef, model_cfg, spec: RolloutSpec, *, speculation: Optional[SpeculativeSpec] = None,
                  drafter=None, cache_len: Optional[int] = None, mesh: Optional[Mesh] = None,
                  pad_side: str = "left", group_sources: int = 16, store: Optional[GroupStore] = None) -> Rollout:
    """A :class:`PlainRollout` (``speculation`` None) or a :class:`SpeculativeRollout` (``drafter``: the drafter
    module, for the learned proposer) of the model ``graphdef`` of config ``model_cfg``."""
    if speculation is None:
        return PlainRollout(graphdef, spec, context_len=model_cfg.max_position_embeddings, cache_len=cache_len,
                            mesh=mesh, pad_side=pad_side)
    use = speculation.learned and drafter is not None
    return SpeculativeRollout(graphdef, spec, speculation, model_cfg=model_cfg,
                              drafter_graphdef=nnx.split(drafter)[0] if use else None,
                              drafter_cfg=drafter.cfg if drafter is not None else None, cache_len=cache_len,
                              mesh=mesh, pad_side=pad_side, group_sources=group_sources, store=store)


def generate(model, prompts: Sequence[Sequence[int]], spec: RolloutSpec, *, seed: int = 0,
             speculation: Optional[SpeculativeSpec] = None, drafter=None, cache_len: Optional[int] = None,
             max_new: Optional[Sequence[int]] = None, pad_side: str = "left", mesh: Optional[Mesh] = None,
             on_chunk=None, group_sources: int = 16, store: Optional[GroupStore] = None) -> RolloutOutput:
    """A rollout of a Decoder module in one call (notebooks, tests): :func:`fixed_rollout`'s, with the
    ``drafter`` module's parameters when the learned proposer drafts."""
    graphdef, params = nnx.split(model)
    rollout = fixed_rollout(graphdef, model.cfg, spec, speculation=speculation, drafter=drafter,
                            cache_len=cache_len, mesh=mesh, pad_side=pad_side, group_sources=group_sources,
                            store=store)
    use = speculation is not None and speculation.learned and drafter is not None
    return rollout.generate(params, prompts, seed=seed, max_new=max_new, on_chunk=on_chunk,
                            drafter=DrafterInput(nnx.split(drafter)[1]) if use else None)
