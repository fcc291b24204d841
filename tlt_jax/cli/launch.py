"""Runs one job as several processes on this machine (what a pod or a cluster does with one process per host).

    tlt-launch --processes 2 [--local-devices 1] [--pin-cores] -- tlt-train --config configs/tiny.py --workdir /tmp/run

Each process gets TLT_COORDINATOR (127.0.0.1 and a free port), TLT_NUM_PROCESSES and TLT_PROCESS_ID (and
TLT_LOCAL_DEVICES), which the job commands read. ``--pin-cores`` gives each process its own share of this
machine's cores (CPU affinity, in TLT_CORES): with one rollout replica per process, each replica then runs on
cores of its own, concurrently with the others, and a replica that has finished leaves its cores to its own
spot training; more processes than cores is an error. Process 0 prints as usual; the others' lines are prefixed with
``[pN]``. When a process fails, the others get ``--grace`` seconds to notice and stop on their own (a job's
processes detect a dead peer themselves), then are stopped; the launcher says who failed first and exits with that
process's status. Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

from tlt_jax.parallel.multihost import ENV_CORES, core_sets, free_port


def _describe(pid: int, code: int) -> str:
    if code < 0:
        try:
            return f"process {pid} died of signal {signal.Signals(-code).name}"
        except ValueError:
            return f"process {pid} died of signal {-code}"
    return f"process {pid} exited with status {code}"


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        out.write(prefix + text if prefix else text)
        out.flush()
    stream.close()


def launch(command: Sequence[str], processes: int, *, local_devices: Optional[int] = None, port: int = 0,
           grace_s: float = 60.0, pin_cores: bool = False, log=None) -> int:
    """Starts ``processes`` copies of ``command`` joined as one job (``pin_cores``: each on its own cores,
    :func:`core_sets`); returns the job's exit status."""
    log = log or (lambda m: print(f"[tlt-launch] {m}", file=sys.stderr, flush=True))
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if not command:
        raise ValueError("no command to launch (put it after --)")
    pins = core_sets(processes, what="--pin-cores") if pin_cores else [None] * processes
    coordinator = f"127.0.0.1:{port or free_port()}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC would route 127.0.0.1 via one
    env.update(TLT_COORDINATOR=coordinator, TLT_NUM_PROCESSES=str(processes), PYTHONUNBUFFERED="1")
    if local_devices:
        env["TLT_LOCAL_DEVICES"] = str(local_devices)
    procs: List[subprocess.Popen] = []
    pumps = []
    stopped: set = set()
    log(f"{processes} process(es) of {' '.join(command)} (coordinator {coordinator})"
        + (f"; cores {', '.join(f'p{i}: {c}' for i, c in enumerate(pins))}" if pin_cores else ""))
    try:
        for pid in range(processes):
            child = dict(env, TLT_PROCESS_ID=str(pid))
            if pins[pid] is not None:
                child[ENV_CORES] = ",".join(map(str, pins[pid]))
            p = subprocess.Popen(list(command), env=child, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True,
                                 preexec_fn=(lambda c=pins[pid]: os.sched_setaffinity(0, c)) if pins[pid] else None)
            procs.append(p)
            prefix = f"[p{pid}] " if pid else ""
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, prefix), daemon=True)
                t.start()
                pumps.append(t)
        first_failure = None  # (time, pid, code)
        while any([p.poll() is None for p in procs]):  # (a list: poll every process, not just the first live)
            if first_failure is None:
                for pid, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        first_failure = (time.monotonic(), pid, p.returncode)
                        log(f"{_describe(pid, p.returncode)}; the others have {grace_s:.0f}s to stop on their own")
                        break
            elif time.monotonic() > first_failure[0] + grace_s:
                for pid, p in enumerate(procs):
                    if p.poll() is None:
                        log(f"stopping process {pid} (still running {grace_s:.0f}s after the failure)")
                        stopped.add(pid)
                        os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait()
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    failed = [(pid, c) for pid, c in enumerate(codes) if c != 0 and pid not in stopped]
    log("job failed: " + "; ".join(_describe(pid, c) for pid, c in failed)
        + (f"; stopped process(es) {sorted(stopped)}" if stopped else ""))
    pid, code = (first_failure[1], first_failure[2]) if first_failure else failed[0]
    return code if code > 0 else 128 - code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="tlt-launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2, help="how many processes (default 2)")
    ap.add_argument("--local-devices", type=int, default=None, help="CPU only: XLA devices per process")
    ap.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--pin-cores", action="store_true",
                    help="give each process its own share of the cores (one rollout replica per process owns them)")
    ap.add_argument("--grace", type=float, default=60.0,
                    help="seconds the others get to stop on their own after a process fails (default 60)")
    args = ap.parse_args(argv)
    try:
        return launch(command, args.processes, local_devices=args.local_devices, port=args.port, grace_s=args.grace,
                      pin_cores=args.pin_cores)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
