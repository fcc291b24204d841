"""Ahead-of-time compilation of a config's programs from abstract arrays: no weights, no device memory.

    python -m tlt_jax.parallel.aot --config configs/qwen2_5_7b.py [--devices 8] [--rows 8] [--prompt-len 256]
        [--answer-len 1024] [--bucket 8] [--strategy 4_2_8] [--json PATH] [--config.a.b=v ...]

compiles, for the config's model on a mesh of ``--devices`` devices (fake CPU devices when run on a CPU):

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

import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax import jsonio

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
    from tlt_jax.config import model_config_from_arch
    from tlt_jax.models.weights import abstract_model

    cfg = model_config_from_arch(config)
    graphdef, state = nnx.split(abstract_model(cfg))
    return cfg, graphdef, state


def compile_train_step(config, devices: Sequence[jax.Device], rows: int, prompt_len: int, answer_len: int
                       ) -> Dict[str, Any]:
    """Lowers and compiles the sharded GRPO update for ``rows`` rows of ``prompt_len + answer_len`` tokens."""
    from tlt_jax.parallel.mesh import make_mesh
    from tlt_jax.parallel.sharding import bytes_per_device, opt_state_shardings, tree_shardings
    from tlt_jax.rl import grpo

    rl = config.rl
    cfg, graphdef, params = abstract_policy(config)
    mesh = make_mesh(config.mesh, devices)
    pshard = tree_shardings(params, mesh)
    params = _with_sharding(params, pshard)
    optimizer = grpo.make_optimizer(float(rl.lr), float(rl.weight_decay), float(rl.grad_clip), int(rl.warmup_steps))
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
    gcfg = grpo.GRPOConfig(clip_eps=float(rl.clip_eps), kl_coef=float(rl.kl_coef), aggregation=rl.aggregation,
                           temperature=float(rl.temperature) or 1.0, remat=bool(config.train.remat))
    fn = grpo.sharded_update(mesh, graphdef, optimizer, gcfg, pshard, oshard, rows_sh)
    t0 = time.perf_counter()
    lowered = fn.lower(params, opt_abs, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state_bytes = bytes_per_device((params, opt_abs), (pshard, oshard))
    return {"program": "train_step", "mesh": dict(mesh.shape), "rows": rows, "tokens_per_row": length,
            "remat": gcfg.remat,
            "num_params": int(cfg.num_params()), "param_dtype": cfg.param_dtype,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "state_gib_per_device_max": round(float(state_bytes.max()) / GIB, 3), **_memory(compiled)}


def compile_speculative_chunk(config, devices: Sequence[jax.Device], bucket: int, cache_len: int,
                              strategy: str) -> Dict[str, Any]:
    """Lowers and compiles one replica's speculative chunk (``strategy``, EAGLE drafter) for ``bucket`` rows."""
    from tlt_jax.models.drafter import Drafter
    from tlt_jax.rollout import RolloutSpec, SamplingParams
    from tlt_jax.rollout.speculative import SpeculativeSpec, speculative_chunk, start_speculative
    from tlt_jax.engine.adaptive import _shardings, make_replicas

    cfg, graphdef, params = abstract_policy(config)
    dgraphdef, dparams = nnx.split(nnx.eval_shape(lambda: Drafter(cfg, nnx.Rngs(0))))
    from tlt_jax.parallel.sharding import tree_shardings

    replica = make_replicas(int(config.tlt.replicas), devices, int(config.tlt.replica_tensor))[0]
    rep = NamedSharding(replica.mesh, P())
    params = _with_sharding(params, tree_shardings(params, replica.mesh))
    dparams = _with_sharding(dparams, jax.tree.map(lambda _: rep, dparams))
    spec = RolloutSpec(max_new_tokens=cache_len // 2, stop_tokens=(0,),
                       sampling=SamplingParams(float(config.rl.temperature), int(config.rl.top_k),
                                               float(config.rl.top_p)),
                       chunk_steps=int(config.rollout.chunk_steps), attn_impl=config.model.attn_impl)
    sspec = SpeculativeSpec.from_arm(strategy, int(config.speculative.ngram_max), int(config.speculative.ngram_min))
    toks = jax.ShapeDtypeStruct((bucket, 8), jnp.int32)
    state = jax.eval_shape(lambda p, d, t, v, m, k: start_speculative(
        p, d, t, v, m, k, graphdef=graphdef, dgraphdef=dgraphdef, spec=spec, sspec=SpeculativeSpec(proposer="none"),
        cache_len=cache_len), params, dparams, toks, jax.ShapeDtypeStruct((bucket, 8), jnp.bool_),
        jax.ShapeDtypeStruct((bucket,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    state = _with_sharding(state, _shardings(state, replica.mesh, bucket))
    t0 = time.perf_counter()
    lowered = speculative_chunk.lower(params, dparams, state, graphdef=graphdef, dgraphdef=dgraphdef, spec=spec,
                                      sspec=sspec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"program": "speculative_chunk", "replica_devices": len(replica.devices),
            "replica_mesh": dict(replica.mesh.shape), "bucket": bucket,
            "cache_len": cache_len, "strategy": strategy, "chunk_steps": spec.chunk_steps,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), **_memory(compiled)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tlt_jax.cli.common import config_main

    def arguments(ap):
        ap.add_argument("--devices", type=int, default=8, help="devices of the mesh (CPU: fake devices)")
        ap.add_argument("--rows", type=int, default=8, help="rows of the train step's mini-batch")
        ap.add_argument("--prompt-len", type=int, default=256)
        ap.add_argument("--answer-len", type=int, default=1024)
        ap.add_argument("--bucket", type=int, default=8, help="rows of the speculative chunk")
        ap.add_argument("--strategy", default="4_2_8", help="the chunk's strategy (an engine arm)")
        ap.add_argument("--only", choices=("train_step", "speculative_chunk"), default=None)
        ap.add_argument("--json", default=None, help="also write the report here")

    def run(config, args) -> int:
        devices = jax.devices()
        if len(devices) < args.devices:
            print(f"error: {args.devices} devices wanted, {len(devices)} available (on a CPU, set "
                  f"--config.mesh.cpu_devices={args.devices})", flush=True)
            return 2
        devices = devices[:args.devices]
        reports = []
        if args.only in (None, "train_step"):
            reports.append(compile_train_step(config, devices, args.rows, args.prompt_len, args.answer_len))
            print(jsonio.json_line(reports[-1]), end="", flush=True)
        if args.only in (None, "speculative_chunk"):
            cache = -(-(args.prompt_len + args.answer_len) // 64) * 64
            reports.append(compile_speculative_chunk(config, devices, args.bucket, cache, args.strategy))
            print(jsonio.json_line(reports[-1]), end="", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                jsonio.dump({"config": config.name, "platform": devices[0].platform, "reports": reports}, f, indent=1)
        return 0

    return config_main("tlt_jax.parallel.aot", __doc__, arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
