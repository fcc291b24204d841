"""A (data, fsdp, tensor) device mesh from the sizes of the ``mesh`` config section."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from tlt_jax.core.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the rollout batch is split over both


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> Tuple[int, int, int]:
    """Resolves the one axis that may be -1 (fill) and checks that data x fsdp x tensor equals the device count.
    The sizes themselves (positive or -1, at most one -1) are checked where the config is read
    (``app.specs``)."""
    sizes = [int(sizes[a]) for a in MESH_AXES]
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


def apply_cpu_devices(count: int, log=print) -> None:
    """``count`` > 0: the CPU backend starts with that many devices (one rollout replica per device). They are
    devices of one process and share its intra-op thread pool, so their programs share the host's cores (each
    program already uses all of them; measured in the README, "The long tail"). Must run before anything starts
    JAX's backends; afterwards it only warns."""
    if count <= 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as e:
        log(f"[tlt] mesh.cpu_devices={count} ignored: JAX has already started ({e})")


def first_local(devices: Sequence[jax.Device], n: int) -> list:
    """The first ``n`` devices of every process in ``devices``, in their order (``n`` = 0: all of them)."""
    if n <= 0:
        return list(devices)
    seen: dict = {}
    out = []
    for d in devices:
        k = seen.get(d.process_index, 0)
        if k < n:
            out.append(d)
        seen[d.process_index] = k + 1
    return out


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
