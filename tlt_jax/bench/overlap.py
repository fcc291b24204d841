"""Do two rollout replicas on one CPU host run at the same time? One program on one XLA device, then the same
program on two devices at once, side by side in one run, for each layout asked for.

    python -m tlt_jax.bench.overlap [--layouts "default;--xla_cpu_multi_thread_eigen=false ...;processes"]
        [--reps 10] [--size 1536] [--json PATH]

A layout is an XLA flag set for one process with two host devices (``--xla_force_host_platform_device_count=2``
plus the flags; ``default``: no more flags), run in a process of its own (``XLA_FLAGS`` are read when JAX
starts), or ``processes``: one process per replica, each with one device and pinned to its own share of the
cores (``parallel.multihost.core_sets``, what ``tlt-launch --pin-cores`` does); "one" is one such process
running alone, "both" two of them started together (each compiles first, then they wait for a common start).
The program is a stack of float32 matmuls of a decoder's size. Reported per layout: the seconds of
``--reps`` calls on one replica alone, of the same calls on both at once (two threads of one process, or two
processes, so nothing waits on the host), ``both / one`` (1.0: the replicas overlap, each on its own cores;
2.0: they take turns) and the CPU utilisation (cores busy) in each phase. A replica that owns its cores needs
``both / one`` near 1 with about one core busy per replica.
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
from tlt_jax.parallel.multihost import core_sets

DEFAULT_LAYOUTS = "default;--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1;processes"


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


def _single(size: int, reps: int, go: str) -> dict:
    """A ``processes`` worker: compiles on its one device, says ready, waits for ``go`` to exist, runs."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def program(w, x):
        for _ in range(6):
            x = jnp.tanh(x @ w)
        return x

    w = jnp.full((size, size), 1.0 / size, jnp.float32)
    x = jnp.ones((size // 4, size), jnp.float32)
    program(w, x).block_until_ready()
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    start = time.time()

    def run():
        out = [program(w, x) for _ in range(reps)]
        out[-1].block_until_ready()

    wall, busy = _busy(run)
    return {"start": start, "end": start + wall, "wall": wall, "busy": busy}


def _processes(n: int, size: int, reps: int) -> dict:
    """``n`` pinned one-device processes started together: (wall seconds from the first start to the last
    end, cores busy)."""
    import tempfile

    pins = core_sets(2, what="the processes layout")[:n]
    go = os.path.join(tempfile.mkdtemp(prefix="tlt_overlap_"), "go")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "tlt_jax.bench.overlap", "--worker", "--single", go,
                               "--reps", str(reps), "--size", str(size)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=lambda c=c: os.sched_setaffinity(0, c))
             for c in pins]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a processes-layout worker failed:\n{p.communicate()[1][-2000:]}")
    open(go, "w").close()
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a processes-layout worker failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    os.remove(go)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"wall": wall, "busy": sum(r["busy"] * r["wall"] for r in results) / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="';'-separated XLA flag sets ('default': none)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--single", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.size < 8:
        ap.error("need --reps >= 1 and --size >= 8")
    if args.worker:
        print(json.dumps(_single(args.size, args.reps, args.single) if args.single else _worker(args.size, args.reps)))
        return 0
    rows = []
    for layout in [x.strip() for x in args.layouts.split(";") if x.strip()]:
        if layout == "processes":
            one = min((_processes(1, args.size, args.reps) for _ in range(2)), key=lambda r: r["wall"])
            both = min((_processes(2, args.size, args.reps) for _ in range(2)), key=lambda r: r["wall"])
            rows.append({"layout": layout, "one_s": one["wall"], "both_s": both["wall"],
                         "both_over_one": both["wall"] / one["wall"], "one_busy_cores": one["busy"],
                         "both_busy_cores": both["busy"]})
            print(f"[overlap] {layout}: both / one = {rows[-1]['both_over_one']:.2f}", flush=True)
            continue
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
