"""Ahead-of-time compilation of a config's programs from abstract arrays: no weights, no device memory (the
command is ``tlt-aot``, :mod:`tlt_jax.cli.aot`).

It compiles, for the config's model on a mesh of ``--devices`` devices (fake CPU devices when run on a CPU):

* the GRPO **train step** (forward, backward, optimizer) with the policy and Adam state laid out by the sharding
  rules of ``mesh.*`` (FSDP, tensor parallelism) and a mini-batch of ``--rows`` rows split over the data axes;
* the **speculative chunk** (draft/verify loop with the EAGLE drafter) the rollout engine runs on one replica:
  the devices split into ``tlt.replicas`` sub-meshes of ``tlt.replica_tensor`` x data devices, the policy split
  over the tensor axis (whole on each device when it is 1), ``--bucket`` rows over the data axis, a KV cache for
  ``--prompt-len + --answer-len`` tokens;

and reports each program's compile time and per-device memory from XLA's memory analysis (arguments, outputs,
temporaries). The numbers are those of the CPU compiler when run on a CPU: a check that the paper-scale programs
compile and fit, and their order of magnitude, not the accelerator's exact figures.
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
from tlt_jax.models.decoder import abstract_model
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.parallel.replicas import make_replicas
from tlt_jax.parallel.sharding import bytes_per_device, opt_state_shardings, tree_shardings
from tlt_jax.rl import grpo
from tlt_jax.rollout.speculative import SpeculativeSpec, speculative_chunk, start_speculative

GIB = float(2 ** 30)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _memory(compiled) -> Dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: getattr(m, f"{k}_size_in_bytes") / GIB for k in ("argument", "output", "temp", "alias")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return {f"{k}_gib_per_device": round(v, 3) for k, v in out.items()}


def abstract_policy(config):
    """(ModelConfig, graphdef, abstract parameter state) of the config's model, allocating nothing."""
    cfg = specs.model_config(config)
    graphdef, state = nnx.split(abstract_model(cfg))
    return cfg, graphdef, state


def compile_train_step(config, devices: Sequence[jax.Device], rows: int, prompt_len: int, answer_len: int
                       ) -> Dict[str, Any]:
    """Lowers and compiles the sharded GRPO update for ``rows`` rows of ``prompt_len + answer_len`` tokens."""
    cfg, graphdef, params = abstract_policy(config)
    mesh = make_mesh(specs.mesh_sizes(config), devices)
    pshard = tree_shardings(params, mesh)
    params = _with_sharding(params, pshard)
    optimizer = specs.policy_optimizer(config)
    opt_abs = jax.eval_shape(optimizer.init, params)
    oshard = opt_state_shardings(opt_abs, params, pshard, mesh)
    opt_abs = _with_sharding(opt_abs, oshard)
    rows_sh = grpo.batch_shardings(mesh, rows)
    length = prompt_len + answer_len
    shapes = grpo.TrainBatch(
        jax.ShapeDtypeStruct((rows, length), jnp.int32), jax.ShapeDtypeStruct((rows, length), jnp.bool_),
        jax.ShapeDtypeStruct((rows, answer_len), jnp.bool_), jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows, answer_len), jnp.float32), jax.ShapeDtypeStruct((rows, answer_len), jnp.float32))
    batch = _with_sharding(shapes, rows_sh)
    grpo_config = specs.grpo_config(config)
    fn = grpo.sharded_update(mesh, graphdef, optimizer, grpo_config, pshard, oshard, rows_sh)
    t0 = time.perf_counter()
    lowered = fn.lower(params, opt_abs, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state_bytes = bytes_per_device((params, opt_abs), (pshard, oshard))
    return {"program": "train_step", "mesh": dict(mesh.shape), "rows": rows, "tokens_per_row": length,
            "remat": grpo_config.remat,
            "num_params": int(cfg.num_params()), "param_dtype": cfg.param_dtype,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "state_gib_per_device_max": round(float(state_bytes.max()) / GIB, 3), **_memory(compiled)}


def compile_speculative_chunk(config, devices: Sequence[jax.Device], bucket: int, cache_len: int,
                              strategy: str) -> Dict[str, Any]:
    """Lowers and compiles one replica's speculative chunk (``strategy``, EAGLE drafter) for ``bucket`` rows."""
    cfg, graphdef, params = abstract_policy(config)
    drafter_graphdef, drafter_params = nnx.split(nnx.eval_shape(lambda: Drafter(cfg, nnx.Rngs(0))))
    replica = make_replicas(int(config.tlt.replicas), devices, int(config.tlt.replica_tensor))[0]
    params = _with_sharding(params, tree_shardings(params, replica.mesh))
    drafter_params = _with_sharding(drafter_params, jax.tree.map(lambda _: replica.replicated, drafter_params))
    # the config's rollout, with an answer budget and a stop token for the compiled shapes
    spec = dataclasses.replace(specs.rollout_spec(config, stop_tokens=(0,)), max_new_tokens=cache_len // 2)
    speculation = specs.speculative_spec(config).with_arm(strategy)
    toks = jax.ShapeDtypeStruct((bucket, 8), jnp.int32)
    state = jax.eval_shape(lambda p, d, t, v, m, k: start_speculative(
        p, d, t, v, m, k, graphdef=graphdef, drafter_graphdef=drafter_graphdef, spec=spec,
        speculation=SpeculativeSpec(proposer="none"), cache_len=cache_len), params, drafter_params, toks,
        jax.ShapeDtypeStruct((bucket, 8), jnp.bool_), jax.ShapeDtypeStruct((bucket,), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.uint32))
    state = _with_sharding(state, replica.state_shardings(state))
    t0 = time.perf_counter()
    lowered = speculative_chunk.lower(params, drafter_params, state, graphdef=graphdef,
                                      drafter_graphdef=drafter_graphdef, spec=spec, speculation=speculation)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"program": "speculative_chunk", "replica_devices": len(replica.devices),
            "replica_mesh": dict(replica.mesh.shape), "bucket": bucket,
            "cache_len": cache_len, "strategy": strategy, "chunk_steps": spec.chunk_steps,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), **_memory(compiled)}


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
