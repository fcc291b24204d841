"""Do two rollout replicas on one CPU host run at the same time? One program on one XLA device, then the same
program on two devices at once, side by side in one run, for each XLA flag set asked for.

    python -m tlt_jax.bench.overlap [--layouts "default;--xla_cpu_multi_thread_eigen=false ..."] [--reps 10]
        [--size 1536] [--json PATH]

Each layout runs in its own process (``XLA_FLAGS`` are read when JAX starts) with two host devices
(``--xla_force_host_platform_device_count=2`` plus the layout's flags). The program is a stack of float32
matmuls of a decoder's size. Reported per layout: the seconds of ``--reps`` calls on device 0 alone, of the
same calls on both devices (dispatched from two threads, so nothing waits on the host), ``both / one`` (1.0:
the replicas overlap, each on its own cores; 2.0: they take turns) and the process's CPU utilisation (cores
busy) in each phase. A replica that owns its cores needs ``both / one`` near 1 with about one core busy per
replica.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

from tlt_jax.bench.common import print_table, write_json

DEFAULT_LAYOUTS = "default;--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _busy(fn):
    """(wall seconds, cores busy) of ``fn()``."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def _worker(size: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    devices = jax.devices()[:2]
    if len(devices) < 2:
        raise SystemExit(f"need two host devices, got {jax.devices()}")

    @jax.jit
    def program(w, x):
        for _ in range(6):
            x = jnp.tanh(x @ w)
        return x

    ws = [jax.device_put(jnp.full((size, size), 1.0 / size, jnp.float32), d) for d in devices]
    xs = [jax.device_put(jnp.ones((size // 4, size), jnp.float32), d) for d in devices]
    for w, x in zip(ws, xs):
        program(w, x).block_until_ready()  # compile for each device

    def run(i):
        out = [program(ws[i], xs[i]) for _ in range(reps)]
        out[-1].block_until_ready()

    def both():
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    one_s, one_busy = min((_busy(lambda: run(0)) for _ in range(2)), key=lambda r: r[0])
    both_s, both_busy = min((_busy(both) for _ in range(2)), key=lambda r: r[0])
    return {"one_s": one_s, "both_s": both_s, "both_over_one": both_s / one_s, "one_busy_cores": one_busy,
            "both_busy_cores": both_busy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="';'-separated XLA flag sets ('default': none)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.size < 8:
        ap.error("need --reps >= 1 and --size >= 8")
    if args.worker:
        print(json.dumps(_worker(args.size, args.reps)))
        return 0
    rows = []
    for layout in [x.strip() for x in args.layouts.split(";") if x.strip()]:
        flags = "--xla_force_host_platform_device_count=2" + ("" if layout == "default" else f" {layout}")
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        p = subprocess.run([sys.executable, "-m", "tlt_jax.bench.overlap", "--worker", "--reps", str(args.reps),
                            "--size", str(args.size)], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"layout {layout!r} failed:\n{p.stderr[-2000:]}")
        rows.append({"layout": layout, **json.loads(p.stdout.strip().splitlines()[-1])})
        print(f"[overlap] {layout}: both / one = {rows[-1]['both_over_one']:.2f}", flush=True)
    print()
    print_table(rows, ["layout", "one_s", "both_s", "both_over_one", "one_busy_cores", "both_busy_cores"])
    write_json(args.json, {"cpu_count": os.cpu_count(), "size": args.size, "reps": args.reps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
