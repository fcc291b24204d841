"""A (data, fsdp, tensor) device mesh from config."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from tlt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the rollout batch is split over both


def mesh_shape_from_config(mesh_cfg, num_devices: int) -> Tuple[int, int, int]:
    """Resolves -1 (fill) and checks that data x fsdp x tensor equals the device count."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a} must be a positive size or -1, got {s}")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
                              f"the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    total = int(np.prod(sizes))
    if total != num_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {total} devices does not "
                          f"fit the {num_devices} available devices")
    return tuple(sizes)


def apply_cpu_devices(config, log=print) -> None:
    """``mesh.cpu_devices`` > 0: the CPU backend starts with that many devices (rollout replicas can then run
    concurrently on one host). Must run before anything starts JAX's backends; afterwards it only warns."""
    n = int(config.mesh.get("cpu_devices", 0))
    if n <= 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        log(f"[tlt] mesh.cpu_devices={n} ignored: JAX has already started ({e})")


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape_from_config(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
