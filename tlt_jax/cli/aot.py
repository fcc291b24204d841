"""Compile a config's paper-scale programs ahead of time from abstract arrays (no weights, no device memory).

    tlt-aot --config configs/qwen2_5_7b.py [--target cpu|tpu-v5e|tpu-v5p] [--devices 8] [--rows 8]
        [--prompt-len 256] [--answer-len 1024] [--bucket 8] [--strategy 4_2_8] [--only train_step|speculative_chunk]
        [--json PATH] [--config.a.b=v ...]

What is compiled and reported: see :mod:`tlt_jax.app.aot`. ``--target cpu`` (the default) compiles for this
host's devices; on a CPU, ``--config.mesh.cpu_devices=N`` gives the N (fake) devices. A TPU target compiles
with XLA:TPU on the compile-only devices of an 8-chip topology (the ``tpu`` extra).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import jax

from tlt_jax.app.aot import compile_programs
from tlt_jax.cli.common import config_main
from tlt_jax.core import jsonio
from tlt_jax.parallel import chips


def _arguments(ap) -> None:
    ap.add_argument("--target", default="cpu", help="cpu (this host's devices) or a TPU target: "
                    + ", ".join(t for t, c in chips.CHIPS.items() if c.platform == "tpu"))
    ap.add_argument("--devices", type=int, default=8, help="devices of the mesh (CPU: fake devices)")
    ap.add_argument("--rows", type=int, default=8, help="rows of the train step's mini-batch")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--answer-len", type=int, default=1024)
    ap.add_argument("--bucket", type=int, default=8, help="rows of the speculative chunk")
    ap.add_argument("--strategy", default="4_2_8", help="the chunk's strategy (an engine arm)")
    ap.add_argument("--only", choices=("train_step", "speculative_chunk"), default=None)
    ap.add_argument("--json", default=None, help="also write the report here")


def run(config, args) -> int:
    if args.target != "cpu":
        try:
            devices = chips.compile_only_devices(args.target)
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", flush=True)
            return 2
    else:
        devices = jax.devices()
    if len(devices) < args.devices:
        print(f"error: {args.devices} devices wanted, {len(devices)} available (on a CPU, set "
              f"--config.mesh.cpu_devices={args.devices})", flush=True)
        return 2
    devices = devices[:args.devices]
    reports = compile_programs(config, devices, rows=args.rows, prompt_len=args.prompt_len,
                               answer_len=args.answer_len, bucket=args.bucket, strategy=args.strategy, only=args.only,
                               on_report=lambda r: print(jsonio.json_line(r), end="", flush=True))
    if args.json:
        with open(args.json, "w") as f:
            jsonio.dump({"config": config.name, "platform": devices[0].platform, "reports": reports}, f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return config_main("tlt-aot", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
