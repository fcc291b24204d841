"""Weight-free check of a config: build the abstract model and its shardings, report bytes per device.

    tlt-inspect --config configs/qwen2_5_7b.py [--devices 8] [--config.mesh.tensor=2]

With ``--devices N`` the check runs on N fake CPU devices (nothing is allocated: shapes only).
"""

from __future__ import annotations

import argparse
import os
import sys

from tlt_jax import jsonio


def inspect_config(config, mesh) -> dict:
    """Per-device bytes of parameters and of the rollout KV cache under the config's sharding rules."""
    import jax
    import numpy as np
    from flax import nnx

    from tlt_jax.config import model_config_from_arch
    from tlt_jax.models.kv_cache import init_cache
    from tlt_jax.models.weights import abstract_model, state_path
    from tlt_jax.parallel.sharding import bytes_per_device, cache_shardings, param_shardings
    from tlt_jax.rollout.decode import default_cache_len

    cfg = model_config_from_arch(config)
    _, abstract_state = nnx.split(abstract_model(cfg))
    shard = param_shardings(cfg, mesh)
    paths = [state_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state)]
    param_bytes = bytes_per_device(abstract_state, [shard[p] for p in paths])
    r = config.rollout
    cache_len = int(r.cache_len) or default_cache_len(int(r.max_prompt_len), int(r.max_new_tokens))
    cache = jax.eval_shape(lambda: init_cache(cfg, int(r.batch_size), cache_len))
    cs = cache_shardings(cfg, mesh, int(r.batch_size), cache_len)
    cache_arrays = list(cache.k) + list(cache.v)
    cache_bytes = bytes_per_device(cache_arrays, [cs] * len(cache_arrays))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_state)))
    return {
        "config": config.name, "num_params": n_params, "param_dtype": cfg.param_dtype,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "param_bytes_per_device": param_bytes.tolist(),
        "param_gib_per_device_max": float(param_bytes.max() / 2 ** 30),
        "param_gib_total": float(n_params * np.dtype(cfg.jnp_param_dtype).itemsize / 2 ** 30),
        "rollout_batch": int(r.batch_size), "cache_len": cache_len,
        "kv_cache_gib_per_device_max": float(cache_bytes.max() / 2 ** 30),
        "example_shardings": {p: str(shard[p].spec) for p in paths[:12]},
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=0)
    known, _ = pre.parse_known_args(argv)
    if known.devices and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={known.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from tlt_jax.config import load_config, split_config_args
    from tlt_jax.errors import TltError
    from tlt_jax.parallel import make_mesh

    try:
        path, overrides, rest = split_config_args(argv)
        ap = argparse.ArgumentParser(prog="tlt-inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--devices", type=int, default=0, help="number of fake CPU devices")
        ap.add_argument("--json", default="")
        args = ap.parse_args(rest)
        config = load_config(path or "smollm2_135m", overrides)
        report = inspect_config(config, make_mesh(config.mesh))
    except TltError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report['config']}: {report['num_params'] / 1e9:.2f}B params ({report['param_dtype']}, "
          f"{report['param_gib_total']:.2f} GiB), mesh {report['mesh']}")
    print(f"  parameters per device: {report['param_gib_per_device_max']:.3f} GiB (max over devices)")
    print(f"  KV cache per device for batch {report['rollout_batch']} x {report['cache_len']} slots: "
          f"{report['kv_cache_gib_per_device_max']:.3f} GiB")
    for p, s in report["example_shardings"].items():
        print(f"    {p:45s} {s}")
    if args.json:
        with open(args.json, "w") as f:
            jsonio.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
