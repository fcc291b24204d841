"""Pallas verification attention (GPU and TPU kernels, run by the Pallas interpreter) against the reference."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.attention import IMPLEMENTATIONS, cached_attention, resolve_impl
from tlt_jax.rollout.tree import ancestor_mask

KERNELS = ["pallas_gpu_interpret", "pallas_tpu_interpret"]


def _case(rng, b, t, nh, kvh, d, s, dtype=jnp.float32, tree=True):
    q = jnp.asarray(rng.standard_normal((b, t, nh, d)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, kvh, s, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, kvh, s, d)), dtype)
    kn = jnp.asarray(rng.standard_normal((b, t, kvh, d)), dtype)
    vn = jnp.asarray(rng.standard_normal((b, t, kvh, d)), dtype)
    if tree:  # a random tree per row: node i's parent is any earlier node (node 0 is the root)
        parents = np.full((b, t), -1, np.int32)
        for i in range(1, t):
            parents[:, i] = rng.integers(0, i, size=b)
        mask = ancestor_mask(jnp.asarray(parents), t)
    else:  # an arbitrary mask (each query still sees itself)
        mask = jnp.asarray(rng.random((b, t, t)) < 0.4) | jnp.eye(t, dtype=bool)[None]
    prefix = jnp.asarray(rng.integers(0, s + 1, size=b), jnp.int32)
    return q, kc, vc, prefix, kn, vn, mask


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_reference_random_shapes(impl, seed):
    rng = np.random.default_rng(seed)
    kvh = int(rng.choice([1, 2]))
    nh = kvh * int(rng.choice([1, 2, 4]))  # GQA groups of 1..4
    t = int(rng.integers(1, 12))
    s = int(rng.choice([8, 24, 64, 80, 136]))
    d = int(rng.choice([8, 16, 32]))
    b = int(rng.integers(1, 4))
    args = _case(rng, b, t, nh, kvh, d, s, tree=bool(seed % 2))
    attend = None if seed % 3 == 0 else s
    ref = cached_attention(*args, attend_len=attend, impl="reference")
    out = cached_attention(*args, attend_len=attend, impl=impl)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_edge_prefixes_and_attend_len(impl):
    """Empty prefix, a full cache, and attend_len shorter than the buffer (slots past it never read)."""
    rng = np.random.default_rng(7)
    q, kc, vc, _, kn, vn, mask = _case(rng, 3, 6, 4, 2, 16, 96)
    attend = 72
    # garbage past attend_len must not matter
    kc = kc.at[:, :, attend:].set(1e4)
    vc = vc.at[:, :, attend:].set(jnp.nan)
    prefix = jnp.asarray([0, attend, 33], jnp.int32)
    ref = cached_attention(q, kc, vc, prefix, kn, vn, mask, attend_len=attend, impl="reference")
    out = cached_attention(q, kc, vc, prefix, kn, vn, mask, attend_len=attend, impl=impl)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_bfloat16(impl):
    rng = np.random.default_rng(3)
    args = _case(rng, 2, 5, 4, 1, 32, 48, dtype=jnp.bfloat16)
    ref = cached_attention(*args, impl="reference").astype(jnp.float32)
    out = cached_attention(*args, impl=impl).astype(jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-2, rtol=3e-2)


def _prefilled_tiny_model(rng):
    """A tiny random decoder (GQA 4/2 heads) with 7-token prompts of 2 rows prefilled into a 32-slot cache:
    (model, prompts, hidden, cache)."""
    from flax import nnx

    from tlt_jax.models.config import ModelConfig
    from tlt_jax.models.decoder import Decoder, prefill
    from tlt_jax.models.kv_cache import init_cache

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    model = Decoder(cfg, nnx.Rngs(0))
    prompts = jnp.asarray(rng.integers(1, 64, (2, 7)), jnp.int32)
    _, hidden, cache = prefill(model, prompts, jnp.ones((2, 7), bool), init_cache(cfg, 2, 32))
    return model, prompts, hidden, cache


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_in_the_verify_forward(impl):
    """The decoder's verify forward with a kernel gives the reference logits (tiny random model)."""
    from tlt_jax.models.decoder import verify

    rng = np.random.default_rng(0)
    model, _, _, cache = _prefilled_tiny_model(rng)
    parents = jnp.asarray([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]], jnp.int32)
    toks = jnp.asarray(rng.integers(1, 64, (2, 5)), jnp.int32)
    depth = jnp.asarray([[0, 1, 1, 2, 2], [0, 1, 2, 3, 4]], jnp.int32)
    pos = cache.lengths[:, None] + depth
    mask = ancestor_mask(parents, 5)
    ref = verify(model, toks, pos, mask, cache, attn_impl="reference")
    out = verify(model, toks, pos, mask, cache, attn_impl=impl)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-4, rtol=1e-4)


def test_impl_selection_by_platform():
    assert resolve_impl("auto", "cpu") == "reference"
    assert resolve_impl("auto", "gpu") == "pallas_gpu"
    assert resolve_impl("auto", "tpu") == "pallas_tpu"
    assert resolve_impl("pallas_tpu_interpret", "cpu") == "pallas_tpu_interpret"
    with pytest.raises(ValueError, match="needs a GPU backend"):
        resolve_impl("pallas_gpu", "cpu")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_impl("flash", "cpu")
    assert set(IMPLEMENTATIONS) >= {"reference", "pallas_gpu", "pallas_tpu"}


def _abstract_call(t=5, s=1024, dtype=jnp.float32, new=True):
    sd = jax.ShapeDtypeStruct
    args = [sd((2, t, 4, 16), dtype), sd((2, 2, s, 16), dtype), sd((2, 2, s, 16), dtype), sd((2,), jnp.int32)]
    args += [sd((2, t, 2, 16), dtype), sd((2, t, 2, 16), dtype), sd((2, t, t), jnp.bool_)] if new else [None] * 3
    return args


@pytest.mark.parametrize("new", [True, False], ids=["verify", "decode"])
def test_auto_follows_the_lowering_platform(new):
    """'auto' on this CPU host: the reference when lowered for CPU, the Mosaic kernel when exported for TPU (its
    cache index map lowers without knowing the chip generation: no sign() of the block index)."""
    from jax import export

    fn = jax.jit(lambda *a: cached_attention(*a, attend_len=1001, impl="auto"))
    args = _abstract_call(t=5 if new else 1, new=new)
    assert "tpu_custom_call" in export.export(fn, platforms=["tpu"])(*args).mlir_module()
    assert "custom_call" not in export.export(fn, platforms=["cpu"])(*args).mlir_module()


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_decode_reads_the_cache_alone(impl):
    """Decode (the new token already written, no new keys): the kernels match the reference, over cache blocks
    that do not divide the cache (TPU blocks of 32 slots over 100, the last 77 read)."""
    from kernels_pallas.attention import pallas_gpu, pallas_tpu

    rng = np.random.default_rng(11)
    q, kc, vc, _, _, _, _ = _case(rng, 3, 1, 8, 2, 16, 100)
    kc = kc.at[:, :, 77:].set(1e4)
    vc = vc.at[:, :, 77:].set(jnp.nan)
    prefix = jnp.asarray([1, 77, 40], jnp.int32)
    ref = cached_attention(q, kc, vc, prefix, None, None, None, attend_len=77, impl="reference")
    if impl == "pallas_tpu_interpret":
        out = pallas_tpu.cached_attention(q, kc, vc, prefix, None, None, None, attend_len=77, block_s=32,
                                          interpret=True)
    else:
        out = pallas_gpu.cached_attention(q, kc, vc, prefix, None, None, None, attend_len=77, block_s=16,
                                          interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_kernels_tile_query_rows_and_take_extra_keys():
    """Many query rows (G * T = 160: several query blocks on both kernels) and more new keys than queries (the
    drafter's tree levels attend to earlier levels' keys), with TPU cache blocks of 32 over a cache of 130."""
    from kernels_pallas.attention import pallas_gpu, pallas_tpu

    rng = np.random.default_rng(5)
    b, t, j, nh, kvh, d, s = 2, 20, 26, 8, 1, 16, 130
    q, kc, vc, prefix, _, _, _ = _case(rng, b, t, nh, kvh, d, s)
    kn = jnp.asarray(rng.standard_normal((b, j, kvh, d)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((b, j, kvh, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, t, j)) < 0.5) | (jnp.arange(j)[None, None] == jnp.arange(t)[None, :, None] + 6)
    ref = cached_attention(q, kc, vc, prefix, kn, vn, mask, impl="reference")
    tpu = pallas_tpu.cached_attention(q, kc, vc, prefix, kn, vn, mask, block_s=32, block_m=32, interpret=True)
    gpu = pallas_gpu.cached_attention(q, kc, vc, prefix, kn, vn, mask, interpret=True)
    for out in (tpu, gpu):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_tpu_blocks_follow_the_tiling_rule():
    """A cache block is the whole cache or a multiple of 16 slots: 1001 of 1024 slots and a cache of 4100 (no
    multiple of 8 divides it) keep blocks of 512 (the old choice: one block of 1001 / of 4100 slots)."""
    from kernels_pallas.attention.pallas_tpu import pick_block, pick_query_block

    assert pick_block(1024, 1001, 512) == 512
    assert pick_block(4100, 4100, 512) == 512
    assert pick_block(1024, 300, 512) == 304
    assert pick_block(96, 72, 512) == 96  # small caches: one block, the whole array
    assert pick_query_block(7) == (8, 8) and pick_query_block(448, 256) == (256, 512)


@pytest.mark.parametrize("impl", KERNELS)
def test_decode_and_drafter_attend_through_the_kernels(impl):
    """Every cached attention goes through the op API: the decoder's decode step and the drafter's cached
    forward give the reference's outputs with a kernel (tiny random model)."""
    from flax import nnx

    from tlt_jax.models.decoder import decode
    from tlt_jax.models.drafter import Drafter, init_drafter_cache

    rng = np.random.default_rng(1)
    model, prompts, hidden, cache = _prefilled_tiny_model(rng)
    cfg = model.cfg
    tok = jnp.asarray([3, 9], jnp.int32)
    ref = decode(model, tok, cache, attn_impl="reference")
    out = decode(model, tok, cache, attn_impl=impl)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-4, rtol=1e-4)
    # the kernel really runs (it used to hand decode to the reference)
    assert "pallas_call" in str(jax.make_jaxpr(lambda c: decode(model, tok, c, attn_impl=impl))(cache))

    drafter = Drafter(cfg, nnx.Rngs(1))
    dcache = init_drafter_cache(cfg, 2, 32)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32)[None], (2, 7))
    causal = jnp.tril(jnp.ones((7, 7), bool))[None].repeat(2, 0)
    _, _, dcache = drafter(model, prompts, hidden, pos, causal, dcache, write_slots=pos, read_cache=False)
    dcache = dcache.replace(lengths=jnp.full((2,), 7, jnp.int32))
    feats = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    toks3 = jnp.asarray(rng.integers(1, 64, (2, 3)), jnp.int32)
    pos3 = 7 + jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32)[None], (2, 3))
    mask3 = jnp.tril(jnp.ones((3, 3), bool))[None].repeat(2, 0)
    ref = drafter(model, toks3, feats, pos3, mask3, dcache, attn_impl="reference")[0]
    out = drafter(model, toks3, feats, pos3, mask3, dcache, attn_impl=impl)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
    jaxpr = jax.make_jaxpr(lambda c: drafter(model, toks3, feats, pos3, mask3, c, attn_impl=impl)[0])(dcache)
    assert "pallas_call" in str(jaxpr)  # the drafter's cached attention used to be the reference, hard-coded


def test_config_rejects_unknown_attn_impl():
    from tlt_jax.app.config import ConfigError, load_config

    assert load_config("tiny").model.attn_impl == "auto"
    with pytest.raises(ConfigError, match="model.attn_impl"):
        load_config("tiny", ["--config.model.attn_impl=flash"])


@pytest.mark.parametrize("seed", range(3))
def test_reference_layouts_agree(seed):
    """The keys-major (float32/64) and queries-major (other dtypes) reference formulations give one result."""
    from kernels_pallas.attention import reference

    rng = np.random.default_rng(100 + seed)
    q, kc, vc, prefix, kn, vn, mask = _case(rng, 2, int(rng.integers(1, 9)), 4, 2, 16, 40, tree=bool(seed % 2))
    for args in [(q, kc, vc, prefix, kn, vn, mask), (q, kc, vc, jnp.maximum(prefix, 1), None, None, None),
                 (q, None, None, None, kn, vn, mask)]:
        a, b = reference.keys_major(*args), reference.queries_major(*args)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
