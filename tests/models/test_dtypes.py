"""bfloat16 parameters and compute: close to float32, and the rollout runs."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.hf_tiny import make_tiny_checkpoint
from tlt_jax.models import init_cache, prefill
from tlt_jax.io.weights import load_checkpoint
from tlt_jax.rollout import RolloutSpec, generate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_checkpoint(str(path), "qwen2", tie=False)
    return str(path)


def test_bfloat16_close_to_float32(ckpt):
    cfg32, m32 = load_checkpoint(ckpt)
    cfg16, m16 = load_checkpoint(ckpt, param_dtype="bfloat16", dtype="bfloat16")
    assert m16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 24)))
    valid = jnp.ones((2, 24), bool)
    l32, _, _ = prefill(m32, toks, valid, init_cache(cfg32, 2, 32), all_logits=True)
    l16, h16, c16 = prefill(m16, toks, valid, init_cache(cfg16, 2, 32), all_logits=True)
    assert c16.k[0].dtype == jnp.bfloat16 and h16.dtype == jnp.bfloat16 and l16.dtype == jnp.float32
    err = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
    assert err < 3e-2, err
    # bf16 storage with f32 compute is also allowed
    cfgm, mm = load_checkpoint(ckpt, param_dtype="bfloat16", dtype="float32")
    lm, _, _ = prefill(mm, toks, valid, init_cache(cfgm, 2, 32), all_logits=True)
    assert float(jnp.linalg.norm(lm - l32) / jnp.linalg.norm(l32)) < 3e-2


def test_bfloat16_rollout(ckpt):
    _, m16 = load_checkpoint(ckpt, param_dtype="bfloat16", dtype="bfloat16")
    res = generate(m16, [[1, 2, 3], [4, 5, 6, 7, 8]], RolloutSpec(max_new_tokens=8))
    assert [len(t) for t in res.tokens] == [8, 8] and all(np.isfinite(lp).all() for lp in res.logprobs)
