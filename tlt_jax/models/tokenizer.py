"""Tokenizers: transformers' tokenizer and chat template, built once from a GGUF file and cached on disk."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence

from tlt_jax.errors import CheckpointError
from tlt_jax.models.weights import resolve_checkpoint


def cache_root() -> str:
    return os.environ.get("TLT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tlt_jax"))


def _gguf_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def load_tokenizer(checkpoint: str):
    """Tokenizer for a checkpoint: a safetensors directory (its own tokenizer files) or a GGUF file.

    For GGUF the conversion (~seconds) runs once; the result is saved under ``$TLT_CACHE_DIR`` (default
    ``~/.cache/tlt_jax``) and later loads read the saved fast tokenizer.
    """
    import transformers

    path = resolve_checkpoint(checkpoint)
    if os.path.isdir(path):
        try:
            return transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"no usable tokenizer in {path}: {e}") from e
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    cached = os.path.join(cache_root(), "tokenizers", _gguf_key(path))
    if os.path.exists(os.path.join(cached, "tokenizer.json")):
        return transformers.PreTrainedTokenizerFast.from_pretrained(cached)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        pass  # another process won the race; its copy is equivalent
    return tok


def chat_prompt_ids(tokenizer, user_messages: Sequence[str], system: Optional[str] = None) -> List[List[int]]:
    """Token ids of single-turn chat prompts with the generation prompt appended."""
    out = []
    for msg in user_messages:
        conv: List[Dict[str, str]] = []
        if system is not None:
            conv.append({"role": "system", "content": system})
        conv.append({"role": "user", "content": msg})
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def stop_token_ids(tokenizer, extra: Sequence[str] = ()) -> List[int]:
    """EOS id plus the ids of extra stop strings that are single tokens (e.g. '<|im_end|>')."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for s in extra:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == tokenizer.unk_token_id:
            raise CheckpointError(f"stop token {s!r} is not a single token of this tokenizer")
        ids.append(int(tid))
    return sorted(set(ids))
