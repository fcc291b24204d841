"""The GPU kernel without a GPU: programs lowered for CUDA on any host, their Triton kernels compiled offline.

``export_cuda(fn, *args)`` lowers a jitted function for the ``cuda`` platform with ``jax.export`` (the Pallas
Triton kernel becomes a ``__gpu$xla.gpu.triton`` custom call carrying the kernel's Triton IR);
``triton_kernels(exported)`` reads those kernels back; ``compile_sm90(kernel)`` compiles one with the ``triton``
wheel (the ``cuda`` extra) for an H100 (sm_90) and reports what ptxas allocated: registers per thread,
spilled bytes (local memory) and shared memory. This is how the kernel's launch parameters are checked at paper
shapes on a host without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Dict, List

from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    name: str
    ttir: str          # the kernel's Triton IR as text
    num_warps: int
    num_stages: int
    grid: tuple


def export_cuda(fn, *args) -> export.Exported:
    """``jax.export`` of the jitted ``fn`` for CUDA. The export's stability check refuses the Triton custom
    call (its IR is tied to this jaxlib); it is disabled for that call only."""
    return export.export(fn, platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)


def triton_kernels(exported: export.Exported) -> List[TritonKernel]:
    """The Triton kernels of an exported program, in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir

    found = []
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        if (inner.name == "stablehlo.custom_call"
                                and ir.StringAttr(inner.attributes["call_target_name"]).value == TRITON_CALL):
                            found.append(ir.DictAttr(inner.attributes["mhlo.backend_config"]))
                        walk(inner)

        walk(module.operation)
        configs = [{k: c[k] for k in ("name", "ir", "num_warps", "num_stages", "grid_x", "grid_y", "grid_z")}
                   for c in found]
        raw = [(ir.StringAttr(c["name"]).value, ir.StringAttr(c["ir"]).value_bytes,
                ir.IntegerAttr(c["num_warps"]).value, ir.IntegerAttr(c["num_stages"]).value,
                tuple(ir.IntegerAttr(c[g]).value for g in ("grid_x", "grid_y", "grid_z"))) for c in configs]
    kernels = []
    for name, bytecode, warps, stages, grid in raw:
        ctx = ir.Context()
        jax_triton.dialect.register_dialect(ctx)
        with ctx:
            ctx.allow_unregistered_dialects = True
            text = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)
        kernels.append(TritonKernel(name, text, warps, stages, grid))
    return kernels


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_sm90(kernel: TritonKernel) -> Dict[str, int]:
    """Compiles the kernel's Triton IR for sm_90 with the ``triton`` wheel (no GPU needed); returns
    ``{"registers", "spill_bytes", "shared_bytes"}`` as ptxas allocated them (``cuobjdump -res-usage``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated (else it warns)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tlt_jax_triton_cache"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(src, "w") as f:
            f.write(kernel.ttir)
        compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", usage.split("Function", 1)[-1]))
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]),
            "shared_bytes": int(compiled.metadata.shared)}

