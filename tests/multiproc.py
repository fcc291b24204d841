"""Runs a test function in several JAX processes on 127.0.0.1 (see tests/multiproc_worker.py).

``run_processes("tests.some_module:fn", 2, {"k": 1})`` starts two python processes that join through
``tlt_jax.parallel.multihost.initialize`` (CPU devices, gloo collectives), calls ``fn(args)`` in each and returns
the JSON results in process order. If a process fails or the whole run times out, the rest are killed (after a
short grace period) and ``ProcessesFailed`` (an AssertionError) reports every process's exit and stderr tail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from tlt_jax.parallel.multihost import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
_TAIL_CHARS = 4000


@dataclasses.dataclass
class Outcome:
    """How one process ended."""

    process_id: int
    returncode: Optional[int]  # None: still running when killed; negative: killed by that signal
    killed: bool  # the launcher killed it (timeout, or a peer failed and it did not exit in the grace period)
    seconds: float  # from the start of the run until it ended or was killed
    stdout: str
    stderr: str
    result: object = None  # the parsed RESULT line, if any

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed

    def describe(self) -> str:
        if self.killed:
            how = "killed by the launcher"
        elif self.returncode is not None and self.returncode < 0:
            try:
                how = f"died of signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                how = f"died of signal {-self.returncode}"
        else:
            how = f"exited with code {self.returncode}"
        return f"process {self.process_id} {how} after {self.seconds:.1f}s"


class ProcessesFailed(AssertionError):
    """A multi-process run failed; ``outcomes`` holds every process's ``Outcome`` in process order."""

    def __init__(self, message: str, outcomes: List[Outcome]):
        super().__init__(message)
        self.outcomes = outcomes


def child_env(local_devices: int) -> dict:
    """The parent's environment for a CPU worker: its own device count, offline, the repo importable, no proxies."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC would route 127.0.0.1 through one
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={local_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + inherited)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def _parse_result(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def run_processes(target: str, num_processes: int, args: dict, local_devices: int = 2, timeout_s: float = 240, *,
                  grace_s: float = 5.0, init_timeout_s: int = 60) -> list:
    """Runs ``target`` ("package.module:function") as ``function(args)`` in ``num_processes`` joined processes.

    Returns the functions' JSON results ordered by process id. ``timeout_s`` bounds the whole run; once a process
    fails, the others get ``grace_s`` seconds to end on their own before they are killed. ``init_timeout_s`` goes to
    ``multihost.initialize`` (peer connection and dead-peer detection).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    env = child_env(local_devices)
    start = time.monotonic()
    procs, files = [], []
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="multiproc-") as tmp:
        try:
            for pid in range(num_processes):
                payload = json.dumps({"coordinator": coordinator, "num_processes": num_processes, "process_id": pid,
                                      "local_devices": local_devices, "timeout_s": int(init_timeout_s),
                                      "target": target, "args": args})
                out = open(os.path.join(tmp, f"{pid}.out"), "w+")
                err = open(os.path.join(tmp, f"{pid}.err"), "w+")
                files.append((out, err))
                procs.append(subprocess.Popen([sys.executable, "-m", "tests.multiproc_worker", payload],
                                              cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=err))
            # One waiter thread per process notes the moment it ends, so the report can say who failed first.
            end_times, killed_ids = {}, set()

            def wait_for(pid, proc):
                proc.wait()
                end_times[pid] = time.monotonic()

            for pid, p in enumerate(procs):
                threading.Thread(target=wait_for, args=(pid, p), daemon=True).start()
            deadline = start + timeout_s
            while len(end_times) < num_processes:
                now = time.monotonic()
                failures = [t for pid, t in end_times.items() if procs[pid].returncode != 0]
                if now >= deadline:
                    timed_out = True
                elif not failures or now < min(failures) + grace_s:
                    time.sleep(0.02)
                    continue
                for pid, p in enumerate(procs):  # a timeout, or the grace period after a failure ran out
                    if pid not in end_times:
                        killed_ids.add(pid)
                        p.kill()
                break
            for p in procs:
                p.wait()
            while len(end_times) < num_processes:  # the waiter threads note the killed ones
                time.sleep(0.005)
            ended = {pid: (None if pid in killed_ids else procs[pid].returncode, pid in killed_ids,
                           end_times[pid] - start)
                     for pid in range(num_processes)}
        finally:
            for p in procs:  # only on an error in the launcher itself
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outcomes = []
        for pid, (out, err) in enumerate(files):
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            out.close()
            err.close()
            code, killed, secs = ended[pid]
            try:
                result = _parse_result(stdout)
            except ValueError:
                result = None
            outcomes.append(Outcome(pid, code, killed, secs, stdout, stderr, result))
    if all(o.ok for o in outcomes):
        missing = [o.process_id for o in outcomes if RESULT_PREFIX not in o.stdout]
        if not missing:
            return [o.result for o in outcomes]
        head = f"{target}: no RESULT line from process(es) {missing}"
    elif timed_out:
        head = f"{target}: timed out after {timeout_s:.0f}s"
    else:
        failed = [o for o in outcomes if not o.ok and not o.killed]
        head = f"{target}: " + "; ".join(o.describe() for o in sorted(failed, key=lambda o: o.seconds))
    report = [head] + [f"--- {o.describe()}; stderr tail:\n{_tail(o.stderr)}" for o in outcomes]
    raise ProcessesFailed("\n".join(report), outcomes)
