import time

import pytest

from tlt_jax.io.tokenizer import chat_prompt_ids, load_tokenizer, stop_token_ids
from tlt_jax.core.errors import CheckpointError


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


@pytest.mark.parity
def test_gguf_tokenizer_matches_transformers(tmp_path, monkeypatch):
    """Our torch-free GGUF tokenizer build equals transformers' own GGUF tokenizer load."""
    import os

    import transformers

    from tlt_jax.io.weights import embedded_gguf_path

    monkeypatch.setenv("TLT_CACHE_DIR", str(tmp_path))
    path = embedded_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = load_tokenizer("embedded:smollm2")
    texts = ["What is 12 + 35?", "  leading spaces and 1234567 digits\n\nnew lines",
             "Ünïcödé — emoji 🙂 and 中文", "<|im_start|>user\nhi<|im_end|>", "x" * 300]
    for t in texts:
        assert ours.encode(t) == ref.encode(t), t
        assert ours.decode(ours.encode(t)) == ref.decode(ref.encode(t))
    assert chat_prompt_ids(ours, texts[:2]) == chat_prompt_ids(ref, texts[:2])
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (ref.eos_token_id, ref.bos_token_id,
                                                                        ref.pad_token_id)


def test_enable_thinking_reaches_the_chat_template():
    """data.enable_thinking is the template's switch (Qwen3 writes an empty think block when it is off); a template
    without the switch gives the same prompt either way."""
    tok = load_tokenizer("embedded:smollm2")
    plain = chat_prompt_ids(tok, ["What is 2 + 2?"])
    assert chat_prompt_ids(tok, ["What is 2 + 2?"], enable_thinking=False) == plain
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking is defined "
                         "and enable_thinking is false %}<think>\n\n</think>{% endif %}")
    on = chat_prompt_ids(tok, ["What is 2 + 2?"], enable_thinking=True)[0]
    off = chat_prompt_ids(tok, ["What is 2 + 2?"], enable_thinking=False)[0]
    assert tok.decode(off) == tok.decode(on) + "<think>\n\n</think>"
