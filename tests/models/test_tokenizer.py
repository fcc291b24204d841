import time

import pytest

from tlt_jax.models.tokenizer import chat_prompt_ids, load_tokenizer, stop_token_ids
from tlt_jax.errors import CheckpointError


def test_gguf_tokenizer_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TLT_CACHE_DIR", str(tmp_path))
    first = load_tokenizer("embedded:smollm2")
    t0 = time.perf_counter()
    second = load_tokenizer("embedded:smollm2")
    assert time.perf_counter() - t0 < 2.0
    text = "What is 12 + 35?"
    assert first.encode(text) == second.encode(text)
    ids = chat_prompt_ids(second, [text])[0]
    assert ids[0] == second.convert_tokens_to_ids("<|im_start|>")
    assert second.decode(ids).rstrip().endswith("<|im_start|>assistant")
    assert stop_token_ids(second, ["<|im_end|>"]) == [second.eos_token_id]
    assert any(p.name == "tokenizer.json" for p in tmp_path.rglob("*"))


def test_unknown_stop_token():
    tok = load_tokenizer("embedded:smollm2")
    with pytest.raises(CheckpointError, match="not a single token"):
        stop_token_ids(tok, ["<|no such token|>"])
