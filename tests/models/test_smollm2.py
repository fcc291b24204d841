"""The embedded SmolLM2-135M-Instruct: our GGUF import against transformers' own GGUF load."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tlt_jax.models import init_cache, prefill
from tlt_jax.io.tokenizer import chat_prompt_ids, load_tokenizer
from tlt_jax.io.weights import embedded_gguf_path, load_gguf
from tlt_jax.rollout import RolloutSpec, generate

pytestmark = [pytest.mark.parity, pytest.mark.slow]


@pytest.fixture(scope="module")
def models():
    import transformers

    path = embedded_gguf_path()
    cfg, ours = load_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32).eval()
    return cfg, ours, hf, load_tokenizer(path)


def test_architecture(models):
    cfg = models[0]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0


def test_logits_match_transformers(models):
    cfg, ours, hf, tok = models
    ids = chat_prompt_ids(tok, ["What is 12+35? Explain step by step."])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    logits, _, _ = prefill(ours, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), init_cache(cfg, 1, 128),
                           all_logits=True)
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-3, rtol=0)


def test_greedy_answer_identical(models):
    cfg, ours, hf, tok = models
    ids = chat_prompt_ids(tok, ["What is 12+35?"])[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    res = generate(ours, [ids], RolloutSpec(max_new_tokens=32, stop_tokens=(tok.eos_token_id,)))
    assert len(out) == 32  # the answer is longer than 32 tokens: a full 32-token comparison
    assert res.tokens[0] == out
    assert res.finish_reasons == ["length"]
