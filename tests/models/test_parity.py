"""Parity with transformers (PyTorch) on tiny random Llama / Qwen2 / Qwen3 checkpoints, float32, 1e-4."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.models.hf_tiny import make_tiny_checkpoint
from tlt_jax.models import decode, init_cache, prefill, verify
from tlt_jax.io.weights import load_checkpoint

pytestmark = pytest.mark.parity
TOL = 1e-4

CASES = {
    "llama_tied": dict(arch="llama", tie=True),
    "qwen2_untied": dict(arch="qwen2", tie=False),
    "llama3_rope": dict(arch="llama", tie=False, llama3_rope=True),
    "qwen3_tied": dict(arch="qwen3", tie=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(str(path), **CASES[request.param])
    cfg, model = load_checkpoint(str(path))
    return request.param, hf, cfg, model


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens)[None])).logits[0].numpy()


def test_config_imported(pair):
    name, hf, cfg, _ = pair
    assert cfg.architecture == CASES[name]["arch"]
    assert cfg.tie_embeddings == CASES[name]["tie"]
    assert cfg.qkv_bias == (CASES[name]["arch"] == "qwen2")
    assert (cfg.rope_scaling is not None) == CASES[name].get("llama3_rope", False)
    assert cfg.qk_norm == (CASES[name]["arch"] == "qwen3")
    assert cfg.head_dim == (24 if cfg.qk_norm else 16)


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefill_padded_batch(pair, side):
    _, hf, cfg, model = pair
    rng = np.random.RandomState(0)
    lens = [7, 23, 80]
    width = 80
    toks = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    rows = [rng.randint(0, cfg.vocab_size, n) for n in lens]
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        toks[i, sl] = r
        valid[i, sl] = True
    logits, _, cache = prefill(model, jnp.asarray(toks), jnp.asarray(valid), init_cache(cfg, 3, 128),
                               all_logits=True)
    logits = np.asarray(logits)
    for i, r in enumerate(rows):
        ref = hf_logits(hf, r)
        np.testing.assert_allclose(logits[i][valid[i]], ref, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)


def test_decode_steps(pair):
    _, hf, cfg, model = pair
    rng = np.random.RandomState(1)
    seq = rng.randint(0, cfg.vocab_size, 40)
    ref = hf_logits(hf, seq)
    p = 30
    _, _, cache = prefill(model, jnp.asarray(seq[None, :p]), jnp.ones((1, p), bool), init_cache(cfg, 1, 64))
    for t in range(p, 40):
        logits, _, cache = decode(model, jnp.asarray(seq[t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits[0]), ref[t], atol=TOL, rtol=0)
    assert int(cache.lengths[0]) == 40


def test_verify_tree(pair):
    """Each node of a tree (arbitrary ancestor mask) scores like the plain forward of prefix + its path."""
    _, hf, cfg, model = pair
    rng = np.random.RandomState(2)
    prefix = rng.randint(0, cfg.vocab_size, 25)
    # A tree of 7 nodes: parents[i] (-1 = child of the last prefix token); listed in a scrambled order.
    parents = [-1, 0, 0, 1, -1, 4, 2]
    nodes = rng.randint(0, cfg.vocab_size, len(parents))
    depth, paths = [], []
    for i in range(len(parents)):
        path, j = [], i
        while j != -1:
            path.append(j)
            j = parents[j]
        paths.append(path[::-1])
        depth.append(len(path) - 1)
    mask = np.zeros((len(parents), len(parents)), bool)
    for i, path in enumerate(paths):
        mask[i, path] = True
    _, _, cache = prefill(model, jnp.asarray(prefix[None]), jnp.ones((1, len(prefix)), bool), init_cache(cfg, 1, 64))
    logits, hidden, new_kv = verify(model, jnp.asarray(nodes[None]), jnp.asarray(len(prefix) + np.array(depth))[None],
                                    jnp.asarray(mask[None]), cache)
    assert len(new_kv) == cfg.num_layers and new_kv[0][0].shape == (1, len(parents), cfg.num_kv_heads, cfg.head_dim)
    for i, path in enumerate(paths):
        ref = hf_logits(hf, np.concatenate([prefix, nodes[path]]))[-1]
        np.testing.assert_allclose(np.asarray(logits[0, i]), ref, atol=TOL, rtol=0)
    # verify does not write the cache
    assert int(cache.lengths[0]) == len(prefix)


def test_hidden_states_match(pair):
    _, hf, cfg, model = pair
    seq = np.random.RandomState(3).randint(0, cfg.vocab_size, 12)
    _, hidden, _ = prefill(model, jnp.asarray(seq[None]), jnp.ones((1, 12), bool), init_cache(cfg, 1, 16),
                           all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor(seq[None]), output_hidden_states=True).hidden_states[-1][0].numpy()
    np.testing.assert_allclose(np.asarray(hidden[0]), ref, atol=TOL, rtol=0)


def test_greedy_answers_match_generate(pair):
    """Greedy answers of our rollout equal transformers' greedy ``generate`` (12 new tokens, two prompts)."""
    from tlt_jax.rollout import RolloutSpec, generate

    _, hf, cfg, model = pair
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (5, 9)]
    out = generate(model, prompts, RolloutSpec(max_new_tokens=12, chunk_steps=4))
    for p, ours in zip(prompts, out.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert list(ours) == ref


def test_the_eagle_drafter_serves_a_qwen3_target(pair):
    """The drafter's layer follows the target's architecture (q/k norms for Qwen3): speculation with it, a chain
    and a tree, gives the plain greedy answers."""
    name, _, cfg, model = pair
    if cfg.architecture != "qwen3":
        pytest.skip("the Qwen3 case")
    from flax import nnx

    from tlt_jax.models.drafter import Drafter
    from tlt_jax.rollout import RolloutSpec, SpeculativeSpec, SpecStrategy, generate

    drafter = Drafter(cfg, nnx.Rngs(0))
    assert drafter.layer.self_attn.q_norm.weight.shape == (cfg.head_dim,)
    rng = np.random.RandomState(5)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (6, 11)]
    spec = RolloutSpec(max_new_tokens=16, chunk_steps=4)
    plain = generate(model, prompts, spec)
    for strategy in ("chain-3", "3_2_6"):
        out = generate(model, prompts, spec, speculation=SpeculativeSpec(SpecStrategy.parse(strategy)),
                       drafter=drafter)
        assert out.tokens == plain.tokens, strategy
