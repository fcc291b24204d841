"""Accelerator targets for ahead-of-time compilation from a CPU host: the chips' published figures and, for TPUs,
compile-only devices.

With the ``tpu`` extra installed (``pip install -e ".[tpu]"``: the libtpu build that matches this JAX),
:func:`compile_only_devices` gives the devices of a TPU topology without a chip: programs lowered for a mesh of
them run the real XLA:TPU and Mosaic compilers, and their ``memory_analysis()`` / ``cost_analysis()`` are the
TPU compiler's. GPU targets have no compile-only devices here: a program is lowered for CUDA with
``jax.export`` instead (see ``tests/kernels/test_cuda_lowering.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str          # "tpu" or "cuda"
    topology: str          # the topology compile-only devices are taken from: 8 chips ("" for GPUs)
    hbm_bytes: float       # memory per chip
    peak_flops: float      # dense bfloat16 FLOP/s per chip
    hbm_bandwidth: float   # bytes/s per chip
    source: str            # where the three figures are published


GB = 1e9
CHIPS: Dict[str, Chip] = {
    "tpu-v5e": Chip("TPU v5e", "tpu", "v5e:2x4", 16 * GB, 197e12, 819 * GB,
                    "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s)"),
    "tpu-v5p": Chip("TPU v5p", "tpu", "v5p:2x2x2", 95 * GB, 459e12, 2765 * GB,
                    "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s)"),
    "h100": Chip("H100 SXM", "cuda", "", 80 * GB, 989e12, 3350 * GB,
                 "https://www.nvidia.com/en-us/data-center/h100/ (989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s)"),
}


def chip(target: str) -> Chip:
    if target not in CHIPS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(CHIPS)}")
    return CHIPS[target]


def tpu_compiler_available() -> bool:
    """Whether libtpu (the ``tpu`` extra) is installed, so that TPU programs can be compiled here."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def compile_only_devices(target: str) -> List[jax.Device]:
    """The devices of the target's TPU topology, for compiling without a chip (needs the ``tpu`` extra).

    Raises ValueError for a GPU target or an unknown one, RuntimeError when libtpu is missing.
    """
    c = chip(target)
    if c.platform != "tpu":
        raise ValueError(f"{target} has no compile-only devices on this host; lower its programs with "
                         f"jax.export(..., platforms=['cuda'])")
    if not tpu_compiler_available():
        raise RuntimeError(f"compiling for {target} needs libtpu: pip install -e '.[tpu]'")
    return list(tpu_topology(c.topology).devices)


def tpu_topology(name: str):
    """The compile-only topology ``name`` (e.g. ``v5e:2x4``)."""
    # libtpu reads these when it builds the topology; on a host without a TPU they cannot be discovered
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # no chip to guard: several processes (a test and the command it starts, pytest workers) may load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(name, "tpu")
