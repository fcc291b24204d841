"""Several JAX processes (multi-controller) on CPU: set-up and small host-level collectives.

Each process runs the same program; ``initialize`` joins them through ``jax.distributed`` and CPU collectives
(gloo over TCP), after which ``jax.devices()`` lists every process's devices and a jitted computation over a mesh
spanning them runs across processes. The helpers below move small host (numpy) values between processes, e.g. so
that every host takes the same decision. All of them are collective: every process must call them, in the same
order, with arrays of the same shape and dtype.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any, List, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from tlt_jax.core.errors import ConfigError

_joined: Optional[tuple] = None  # (coordinator, num_processes, process_id) once initialize() has run


def _wait_for_coordinator(coordinator: str, timeout_s: float) -> None:
    """Waits until something listens at ``coordinator`` ("host:port"); TimeoutError naming it otherwise."""
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no JAX coordinator (process 0) listening at {coordinator} after {timeout_s:.0f}s "
                                   f"({e})") from None
            time.sleep(0.1)


def initialize(coordinator: str, num_processes: int, process_id: int, local_devices: Optional[int] = None,
               timeout_s: int = 60) -> None:
    """Joins this process to the ``num_processes`` processes that meet at ``coordinator`` ("host:port").

    Process 0 hosts the coordination service at that address. Must run before anything starts the JAX backend
    (``jax.devices()``, any computation). ``local_devices`` sets this process's CPU device count. ``timeout_s``
    bounds the wait for the peers to connect, and how long a silent (dead) peer goes unnoticed before the others
    fail rather than hang: a process other than 0 raises TimeoutError if no coordinator appears; otherwise a
    missing or dead peer makes jax.distributed abort the process (SIGABRT, a DEADLINE_EXCEEDED or "tasks are
    unhealthy" message on stderr) about ``timeout_s`` later. Calling it again with the same arguments once
    initialised does nothing.
    """
    global _joined
    if jax.distributed.is_initialized():
        if _joined is not None and _joined != (coordinator, num_processes, process_id):
            raise RuntimeError(f"already initialised as process {_joined[2]} of {_joined[1]} at {_joined[0]}, "
                               f"not {process_id} of {num_processes} at {coordinator}")
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    timeout_s = int(timeout_s)
    if timeout_s < 1:
        raise ValueError(f"timeout_s must be >= 1, got {timeout_s}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_devices is not None:
        if int(local_devices) < 1:
            raise ValueError(f"local_devices must be >= 1, got {local_devices}")
        # Takes precedence over XLA_FLAGS=--xla_force_host_platform_device_count (e.g. a parent test process's 8).
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    # After connecting, starting the CPU backend exchanges the device topology; those waits count in minutes.
    minutes = max(1, math.ceil(timeout_s / 60))
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
    t0 = time.monotonic()
    if process_id != 0:
        _wait_for_coordinator(coordinator, timeout_s)
    remaining = max(1, int(timeout_s - (time.monotonic() - t0)))
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               cluster_detection_method="deactivate", initialization_timeout=remaining,
                               heartbeat_timeout_seconds=timeout_s, shutdown_timeout_seconds=timeout_s)
    _joined = (coordinator, num_processes, process_id)


def is_multiprocess() -> bool:
    """True when this program runs as several JAX processes."""
    return jax.process_count() > 1


def allgather(x: np.ndarray) -> np.ndarray:
    """Every process's ``x``: returns ``[num_processes, *x.shape]``, row ``p`` from process ``p``.

    ``x`` must have the same shape and dtype on every process; the values come back bit for bit (the bytes travel,
    so float64/int64 survive without x64). One process: a copy of ``x[None]``.
    """
    x = np.asarray(x, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if x.dtype.hasobject:
        raise TypeError(f"allgather needs a numeric array, got dtype {x.dtype}")
    n = jax.process_count()
    if n == 1:
        return x[None].copy()
    raw = x.reshape(x.shape + (1,)).view(np.uint8)  # [*x.shape, itemsize]
    out = np.asarray(multihost_utils.process_allgather(raw, tiled=False))  # [n, *x.shape, itemsize]
    return np.ascontiguousarray(out).view(x.dtype).reshape((n,) + x.shape)


def allgather_tree(tree: Any) -> Any:
    """``allgather`` on every leaf of a pytree (same structure, shapes and dtypes on every process)."""
    return jax.tree.map(lambda leaf: allgather(np.asarray(leaf)), tree)


def agree(x: np.ndarray) -> np.ndarray:
    """Process 0's ``x`` on every process (same shape and dtype as ``x``), so that all take the same decision."""
    return allgather(x)[0]


def assert_same(x: np.ndarray, what: str) -> None:
    """Raises RuntimeError naming ``what`` unless ``x`` is identical on every process (NaNs compare equal)."""
    g = allgather(x)
    differ = [p for p in range(1, g.shape[0]) if not np.array_equal(g[p], g[0], equal_nan=g.dtype.kind in "fc")]
    if differ:
        raise RuntimeError(f"{what} differs between processes: process 0 has {g[0].tolist()!r}, "
                           + ", ".join(f"process {p} has {g[p].tolist()!r}" for p in differ))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ command-line jobs

ENV_COORDINATOR = "TLT_COORDINATOR"  # host:port of process 0 (set by tlt-launch, or by hand)
ENV_NUM_PROCESSES = "TLT_NUM_PROCESSES"
ENV_PROCESS_ID = "TLT_PROCESS_ID"
ENV_LOCAL_DEVICES = "TLT_LOCAL_DEVICES"  # CPU only: this process's device count
ENV_CORES = "TLT_CORES"  # set by tlt-launch --pin-cores: the cores this process owns (its CPU affinity)


def core_sets(processes: int, cores: Optional[Sequence[int]] = None, what: str = "pinning") -> List[List[int]]:
    """``processes`` disjoint, equal shares of ``cores`` (default: the cores this process may run on), one per
    process of a job whose processes each own their cores; the remainder goes unused. More processes than
    cores is a ValueError (``what`` names the option in it)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if processes > len(cores):
        raise ValueError(f"{what}: {processes} processes cannot each own a core of the {len(cores)} this machine "
                         f"gives (cores {cores}); use fewer processes, or let them share the cores")
    per = len(cores) // processes
    return [cores[i * per:(i + 1) * per] for i in range(processes)]


def add_arguments(ap) -> None:
    """The multi-process flags of a job command (each falls back to its TLT_* environment variable)."""
    g = ap.add_argument_group("multi-process (several hosts, or several processes on one host)")
    g.add_argument("--coordinator", default=None, help=f"host:port of process 0 (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, help=f"processes in the job (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, help=f"this process, 0-based (env {ENV_PROCESS_ID})")
    g.add_argument("--local-devices", type=int, default=None,
                   help=f"CPU only: XLA devices of this process (env {ENV_LOCAL_DEVICES})")
    g.add_argument("--distributed", action="store_true",
                   help="join through jax.distributed's own cluster detection (TPU pod slices, SLURM)")
    g.add_argument("--dist-timeout", type=int, default=300,
                   help="seconds to wait for the other processes; a process silent this long counts as dead")


def join_from_arguments(args, log=print) -> bool:
    """Joins the job's processes as ``add_arguments``' flags (or the TLT_* variables) say; False for a
    single-process job. Must run before anything starts JAX's backend."""
    coordinator = args.coordinator or os.environ.get(ENV_COORDINATOR)
    local = args.local_devices if args.local_devices is not None else os.environ.get(ENV_LOCAL_DEVICES)
    if local and int(local) < 1:
        raise ConfigError(f"--local-devices must be >= 1, got {local}")
    if local:  # before anything starts the backend, whether this process joins others or not
        jax.config.update("jax_num_cpu_devices", int(local))
    if coordinator:
        def need(value, env, flag):
            value = value if value is not None else os.environ.get(env)
            if value is None:
                raise ConfigError(f"a multi-process job with a coordinator needs {flag} (or {env})")
            return int(value)

        n = need(args.num_processes, ENV_NUM_PROCESSES, "--num-processes")
        pid = need(args.process_id, ENV_PROCESS_ID, "--process-id")
        if n < 1 or not 0 <= pid < n:
            raise ConfigError(f"process id {pid} is not in [0, {n})")
        if n == 1:
            return False
        initialize(coordinator, n, pid, timeout_s=args.dist_timeout)
    elif args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (CPU hosts; accelerators ignore it)
        jax.distributed.initialize(initialization_timeout=args.dist_timeout,
                                   heartbeat_timeout_seconds=args.dist_timeout)
    else:
        return False
    pinned = f", on cores {sorted(os.sched_getaffinity(0))} of its own" if os.environ.get(ENV_CORES) else ""
    log(f"[tlt] process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.devices()[0].platform} devices{pinned}")
    return True


def describe_failure(e: BaseException) -> str:
    """One line for an error in a multi-process job; collective failures say that a peer has probably died."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
    lost = ("gloo", "Connection closed", "connection reset", "DEADLINE_EXCEEDED", "UNAVAILABLE", "unhealthy",
            "heartbeat", "Socket closed", "Broken pipe")
    me = f"process {jax.process_index()} of {jax.process_count()}"
    if any(s.lower() in text.lower() for s in lost):
        return (f"{me} lost contact with the other processes ({text}); one of them has probably died: see its "
                f"log for the first error")
    return f"{me} failed: {text}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a coordinator started on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
