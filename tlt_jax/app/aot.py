"""Ahead-of-time compilation of a config's programs from abstract arrays: no weights, no device memory (the
commands are ``tlt-aot``, :mod:`tlt_jax.cli.aot`, and ``python -m tlt_jax.bench.aot``).

Every program is compiled for a list of devices: fake CPU devices on a CPU host, or the compile-only devices of a
TPU topology (:func:`tlt_jax.parallel.chips.compile_only_devices`), which run the real XLA:TPU and Mosaic
compilers without a chip. The programs:

* the GRPO **train step** (forward, backward, optimizer) and the **log-prob forward**, with the policy and Adam
  state laid out by the sharding rules of ``mesh.*`` (FSDP, tensor parallelism) and ``rows`` rows split over
  the data axes;
* the rollout programs of one replica (the devices split into ``tlt.replicas`` sub-meshes of
  ``tlt.replica_tensor`` x data devices, the policy split over the tensor axis): the **prefill** and the plain
  **decode chunk** of the baseline's rollout, and the adaptive engine's **speculative chunk** of any of its arms,
  built by the engine itself (:meth:`AdaptiveEngine.program`);
* single **decode** and **verify** steps (one forward of 1 or V tokens over a cache), the units of the
  speculation cost curve.

Each report has the compile time, the per-device memory from XLA's memory analysis (arguments, outputs,
temporaries) and, where the compiler provides them, the FLOPs and bytes accessed of its cost analysis. On a CPU
these are the CPU compiler's figures: a check that the programs compile and fit, not the accelerator's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.app import specs
from tlt_jax.core.shapes import round_up
from tlt_jax.engine.adaptive import AdaptiveEngine
from tlt_jax.models.decoder import abstract_model, causal_mask, decode, verify
from tlt_jax.models.drafter import Drafter
from tlt_jax.models.kv_cache import init_cache
from tlt_jax.parallel.replicas import make_replicas
from tlt_jax.parallel.sharding import bytes_per_device, opt_state_shardings, tree_shardings
from tlt_jax.rl import grpo
from tlt_jax.rollout.decode import decode_chunk, start_rollout

GIB = float(2 ** 30)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _compile(lower: Callable[[], Any], mesh) -> tuple:
    """(compiled, {lower_s, compile_s}) of ``lower()`` (a ``Lowered``), traced under ``mesh``."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def _memory(compiled) -> Dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: getattr(m, f"{k}_size_in_bytes") / GIB for k in ("argument", "output", "temp", "alias")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return {f"{k}_gib_per_device": round(v, 6) for k, v in out.items()}


def _costs(compiled) -> Dict[str, float]:
    """FLOPs and bytes accessed per device from XLA's cost analysis (empty where the compiler gives none)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return {}
    out = {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0))}
    if "optimal_seconds" in ca:  # XLA:TPU's own estimate
        out["xla_optimal_s"] = float(ca["optimal_seconds"])
    return out


def _kernel_calls(compiled) -> int:
    """Custom calls of the Pallas attention kernels in the compiled program (Mosaic for TPU)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - a backend without HLO text
        return 0
    return text.count('custom_call_target="tpu_custom_call"')


def report(program: str, compiled, timings: Dict[str, float], **fields) -> Dict[str, Any]:
    return {"program": program, **fields, **timings, **_memory(compiled), **_costs(compiled),
            "kernel_calls": _kernel_calls(compiled)}


def abstract_policy(config):
    """(ModelConfig, graphdef, abstract parameter state) of the config's model, allocating nothing."""
    cfg = specs.model_config(config)
    graphdef, state = nnx.split(abstract_model(cfg))
    return cfg, graphdef, state


def _train_layout(config, devices):
    cfg, graphdef, params = abstract_policy(config)
    mesh = specs.train_mesh(config, devices)
    pshard = tree_shardings(params, mesh)
    return cfg, graphdef, _with_sharding(params, pshard), pshard, mesh


def _train_batch(mesh, rows: int, prompt_len: int, answer_len: int):
    rows_sh = grpo.batch_shardings(mesh, rows)
    length = prompt_len + answer_len
    shapes = grpo.TrainBatch(
        jax.ShapeDtypeStruct((rows, length), jnp.int32), jax.ShapeDtypeStruct((rows, length), jnp.bool_),
        jax.ShapeDtypeStruct((rows, answer_len), jnp.bool_), jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows, answer_len), jnp.float32), jax.ShapeDtypeStruct((rows, answer_len), jnp.float32))
    return _with_sharding(shapes, rows_sh), rows_sh


def compile_train_step(config, devices: Sequence[jax.Device], rows: int, prompt_len: int, answer_len: int
                       ) -> Dict[str, Any]:
    """Lowers and compiles the sharded GRPO update for ``rows`` rows of ``prompt_len + answer_len`` tokens."""
    cfg, graphdef, params, pshard, mesh = _train_layout(config, devices)
    optimizer = specs.policy_optimizer(config)
    opt_abs = jax.eval_shape(optimizer.init, params)
    oshard = opt_state_shardings(opt_abs, params, pshard, mesh)
    opt_abs = _with_sharding(opt_abs, oshard)
    batch, rows_sh = _train_batch(mesh, rows, prompt_len, answer_len)
    grpo_config = specs.grpo_config(config)
    fn = grpo.sharded_update(mesh, graphdef, optimizer, grpo_config, pshard, oshard, rows_sh)
    compiled, timings = _compile(lambda: fn.lower(params, opt_abs, batch), mesh)
    state_bytes = bytes_per_device((params, opt_abs), (pshard, oshard))
    return report("train_step", compiled, timings, mesh=dict(mesh.shape), rows=rows,
                  tokens_per_row=prompt_len + answer_len, remat=grpo_config.remat, num_params=int(cfg.num_params()),
                  param_dtype=cfg.param_dtype, state_gib_per_device_max=round(float(state_bytes.max()) / GIB, 3))


def compile_logprob(config, devices: Sequence[jax.Device], rows: int, prompt_len: int, answer_len: int
                    ) -> Dict[str, Any]:
    """Lowers and compiles the sharded log-prob forward (old / reference log-probs of a mini-batch)."""
    cfg, graphdef, params, pshard, mesh = _train_layout(config, devices)
    batch, rows_sh = _train_batch(mesh, rows, prompt_len, answer_len)
    fn = grpo.sharded_logprob(mesh, graphdef, answer_len, float(config.rollout.temperature), pshard, rows_sh)
    compiled, timings = _compile(lambda: fn.lower(params, batch.tokens, batch.valid), mesh)
    return report("logprob", compiled, timings, mesh=dict(mesh.shape), rows=rows,
                  tokens_per_row=prompt_len + answer_len)


def _replica_policy(config, devices):
    """(ModelConfig, graphdef, abstract policy laid out on the replica, replica 0 of the config's replicas)."""
    cfg, graphdef, params = abstract_policy(config)
    replica = make_replicas(int(config.tlt.replicas), devices, int(config.tlt.replica_tensor))[0]
    return cfg, graphdef, _with_sharding(params, tree_shardings(params, replica.mesh)), replica


def _rollout_spec(config, cache_len: int):
    """The config's rollout with a stop token and an answer budget that fits ``cache_len``."""
    spec = specs.rollout_spec(config, stop_tokens=(0,))
    return dataclasses.replace(spec, max_new_tokens=min(spec.max_new_tokens, cache_len // 2))


def _replica_fields(replica) -> Dict[str, Any]:
    return {"replica_devices": len(replica.devices), "replica_mesh": dict(replica.mesh.shape)}


def compile_rollout_start(config, devices: Sequence[jax.Device], bucket: int, prompt_len: int, cache_len: int
                          ) -> Dict[str, Any]:
    """The baseline rollout's prefill (prompts into a fresh cache, first token) of ``bucket`` rows on a replica."""
    _, graphdef, params, replica = _replica_policy(config, devices)
    spec = _rollout_spec(config, cache_len)
    rows = replica.rows(bucket)
    args = [jax.ShapeDtypeStruct((bucket, prompt_len), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((bucket, prompt_len), jnp.bool_, sharding=rows),
            jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replica.replicated)]
    compiled, timings = _compile(lambda: start_rollout.lower(params, *args, graphdef=graphdef, spec=spec,
                                                             cache_len=cache_len), replica.mesh)
    return report("prefill", compiled, timings, bucket=bucket, prompt_len=prompt_len, cache_len=cache_len,
                  **_replica_fields(replica))


def compile_decode_chunk(config, devices: Sequence[jax.Device], bucket: int, cache_len: int) -> Dict[str, Any]:
    """The baseline rollout's chunk of ``rollout.chunk_steps`` plain decode steps for ``bucket`` rows."""
    _, graphdef, params, replica = _replica_policy(config, devices)
    spec = _rollout_spec(config, cache_len)
    toks = jax.ShapeDtypeStruct((bucket, 8), jnp.int32)
    state = jax.eval_shape(lambda p, t, v, m, k: start_rollout(p, t, v, m, k, graphdef=graphdef, spec=spec,
                                                               cache_len=cache_len),
                           params, toks, jax.ShapeDtypeStruct((bucket, 8), jnp.bool_),
                           jax.ShapeDtypeStruct((bucket,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    state = _with_sharding(state, replica.state_shardings(state))
    compiled, timings = _compile(lambda: decode_chunk.lower(params, state, graphdef=graphdef, spec=spec),
                                 replica.mesh)
    return report("decode_chunk", compiled, timings, bucket=bucket, cache_len=cache_len,
                  chunk_steps=spec.chunk_steps, **_replica_fields(replica))


def engine_arms(config) -> List[str]:
    """Every arm the config's adaptive engine can run: plain, the learned drafter's and the model-free ones."""
    e = specs.engine_config(config)
    return ["plain"] + list(e.arms) + list(e.ngram_arms)


def compile_speculative_chunk(config, devices: Sequence[jax.Device], bucket: int, cache_len: int,
                              strategy: str) -> Dict[str, Any]:
    """One replica's chunk for the engine arm ``strategy`` (``plain``, a learned-drafter arm such as ``4_2_8``,
    or a model-free one such as ``group:chain-2``) at ``bucket`` rows, as the adaptive engine compiles it."""
    cfg, graphdef, params = abstract_policy(config)
    drafter_graphdef, drafter_params = nnx.split(nnx.eval_shape(lambda: Drafter(cfg, nnx.Rngs(0))))
    engine_config = dataclasses.replace(specs.engine_config(config), max_programs=1)
    spec = _rollout_spec(config, cache_len)
    rows = bucket * engine_config.replicas
    engine = AdaptiveEngine(graphdef, spec, engine_config, batch_size=rows, cache_len=cache_len,
                            drafter_graphdef=drafter_graphdef, devices=devices)
    replica = engine.replicas[0]
    params = _with_sharding(params, tree_shardings(params, replica.mesh))
    drafter_params = _with_sharding(drafter_params, jax.tree.map(lambda _: replica.replicated, drafter_params))
    arm = strategy if strategy == "plain" else engine_config.speculation.with_arm(strategy).arm
    t0 = time.perf_counter()
    compiled = engine.program(replica, engine.top_bucket, arm, params, drafter_params)
    timings = {"compile_s": round(time.perf_counter() - t0, 2)}  # lowering and compiling
    return report("speculative_chunk", compiled, timings, bucket=engine.top_bucket, cache_len=cache_len,
                  strategy=arm, chunk_steps=spec.chunk_steps, **_replica_fields(replica))


def compile_step(config, devices: Sequence[jax.Device], bucket: int, tokens: int, cache_len: int
                 ) -> Dict[str, Any]:
    """One target forward on a replica over a cache of ``cache_len`` slots: a decode step (``tokens`` = 1, the
    token written to the cache) or the verification of a chain of ``tokens`` drafted tokens (read-only)."""
    cfg, graphdef, params, replica = _replica_policy(config, devices)
    impl = config.model.attn_impl
    cache = jax.eval_shape(lambda: init_cache(cfg, bucket, cache_len))
    cache = _with_sharding(cache, replica.state_shardings({"cache": cache})["cache"])
    rows = replica.rows(bucket)
    toks = jax.ShapeDtypeStruct((bucket, tokens), jnp.int32, sharding=rows)

    if tokens == 1:
        def fn(p, tok, c):
            logits, _, c = decode(nnx.merge(graphdef, p), tok[:, 0], c, attn_impl=impl)
            return logits, c
        jitted = jax.jit(fn, donate_argnums=(2,))
    else:
        def fn(p, tok, c):
            pos = c.lengths[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None]
            mask = jnp.broadcast_to(causal_mask(tokens)[None], (bucket, tokens, tokens))
            return verify(nnx.merge(graphdef, p), tok, pos, mask, c, attn_impl=impl)[0]
        jitted = jax.jit(fn)
    compiled, timings = _compile(lambda: jitted.lower(params, toks, cache), replica.mesh)
    return report("decode_step" if tokens == 1 else "verify", compiled, timings, bucket=bucket, tokens=tokens,
                  cache_len=cache_len, **_replica_fields(replica))


def peak_bytes(rep: Dict[str, Any]) -> float:
    """A report's estimated peak bytes per device (arguments + outputs + temporaries - donated aliases)."""
    return float(rep.get("peak_estimate_gib_per_device", 0.0)) * GIB


def compile_programs(config, devices: Sequence[jax.Device], *, rows: int, prompt_len: int, answer_len: int,
                     bucket: int, strategy: str, only: Optional[str] = None,
                     on_report: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """The reports of :func:`compile_train_step` and :func:`compile_speculative_chunk` (``only``: one of them);
    ``on_report`` sees each as soon as its program has compiled."""
    reports = []
    if only in (None, "train_step"):
        reports.append(compile_train_step(config, devices, rows, prompt_len, answer_len))
        if on_report is not None:
            on_report(reports[-1])
    if only in (None, "speculative_chunk"):
        reports.append(compile_speculative_chunk(config, devices, bucket, round_up(prompt_len + answer_len, 64),
                                                 strategy))
        if on_report is not None:
            on_report(reports[-1])
    return reports
