"""The GPU kernel lowered for CUDA on this CPU host (``jax.export``), and its Triton IR compiled for an H100
(sm_90) offline with the ``triton`` wheel: what ptxas allocates at the paper's shapes."""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.attention import cached_attention
from kernels_pallas.attention import cuda_offline

pytestmark = pytest.mark.cuda_lower
needs_triton = pytest.mark.skipif(not cuda_offline.triton_available(), reason="the triton wheel is not installed "
                                  "(pip install -e '.[cuda]')")


def _args(b, t, nh, kvh, d, s, dtype=jnp.bfloat16):
    sd = jax.ShapeDtypeStruct
    args = [sd((b, t, nh, d), dtype), sd((b, kvh, s, d), dtype), sd((b, kvh, s, d), dtype), sd((b,), jnp.int32)]
    if t == 1:
        return args + [None, None, None]
    return args + [sd((b, t, kvh, d), dtype), sd((b, t, kvh, d), dtype), sd((b, t, t), jnp.bool_)]


def _auto(*args):
    return cached_attention(*args, impl="auto")


@pytest.mark.parametrize("t", [1, 8], ids=["decode", "verify"])
def test_the_cuda_program_contains_the_triton_kernel(t):
    """'auto' lowered for CUDA from a CPU host holds the Triton kernel, not the reference (decode included)."""
    exported = cuda_offline.export_cuda(jax.jit(_auto), *_args(2, t, 28, 4, 128, 1024))
    kernels = cuda_offline.triton_kernels(exported)
    assert [k.name for k in kernels] == ["cached_attention_gpu"]
    assert kernels[0].grid[:2] == (2, 4)  # rows x KV heads (x query blocks)


def test_float32_dots_are_not_tf32():
    """float32 inputs are multiplied in IEEE float32 whatever the default matmul precision (TF32 on GPUs)."""
    with jax.default_matmul_precision("default"):
        exported = cuda_offline.export_cuda(jax.jit(_auto), *_args(1, 4, 8, 2, 64, 256, jnp.float32))
    ttir = cuda_offline.triton_kernels(exported)[0].ttir
    assert ttir.count("tt.dot ") == 4  # scores and values, over the cache and over the new tokens
    assert "tf32" not in ttir  # IEEE, the default of tt.dot (TF32 would print inputPrecision = tf32)


SHAPES = [(28, 4, 8192, 16), (28, 4, 32768, 64), (64, 8, 8192, 64), (64, 8, 32768, 16), (28, 4, 32768, 1)]


@needs_triton
@pytest.mark.parametrize("heads,kv_heads,cache,verified", SHAPES,
                         ids=[f"{h}x{k}-S{s}-V{v}" for h, k, s, v in SHAPES])
def test_registers_and_spills_at_paper_shapes(heads, kv_heads, cache, verified):
    """Qwen2.5-7B (28/4 heads) and 32B (64/8), head dim 128, bfloat16, caches of 8k-32k slots, 1-64 verified
    tokens: no spill to local memory, registers under the 255 cap, shared memory under the H100's 227 KiB."""
    exported = cuda_offline.export_cuda(jax.jit(_auto), *_args(1, verified, heads, kv_heads, 128, cache))
    usage = cuda_offline.compile_sm90(cuda_offline.triton_kernels(exported)[0])
    print(f"{heads}/{kv_heads} heads, S={cache}, V={verified}: {usage}")
    assert usage["spill_bytes"] == 0, usage
    assert usage["registers"] < 255, usage
    assert usage["shared_bytes"] <= 227 * 1024, usage
