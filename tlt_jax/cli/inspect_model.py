"""Weight-free check of a config: build the abstract model and its shardings, report bytes per device.

    tlt-inspect --config configs/qwen2_5_7b.py [--devices 8] [--config.mesh.tensor=2]

With ``--devices N`` the check runs on N fake CPU devices (nothing is allocated: shapes only).
"""

from __future__ import annotations

import sys

import jax

from tlt_jax.app import specs
from tlt_jax.app.inspect import inspect_config
from tlt_jax.cli.common import config_main
from tlt_jax.core import jsonio
from tlt_jax.parallel.mesh import apply_cpu_devices


def _arguments(ap) -> None:
    ap.add_argument("--devices", type=int, default=0, help="number of fake CPU devices")
    ap.add_argument("--json", default="")


def run(config, args) -> int:
    report = inspect_config(config, specs.train_mesh(config))
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--devices" in argv:  # fake CPU devices: before anything starts JAX's backend
        n = int(argv[argv.index("--devices") + 1])
        jax.config.update("jax_platforms", "cpu")
        apply_cpu_devices(n)
    return config_main("tlt-inspect", __doc__, _arguments, run, argv, split_cpu=False)


if __name__ == "__main__":
    sys.exit(main())
