"""Tokenizers: transformers' tokenizer and chat template, built once from a GGUF file and cached on disk."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence

from tlt_jax.core.errors import CheckpointError
from tlt_jax.io.weights import open_gguf, resolve_checkpoint


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
    import transformers  # local: heavy (several seconds), needed only when a tokenizer is loaded

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
    tok = tokenizer_from_gguf(path)
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        pass  # another process won the race; its copy is equivalent
    return tok


def tokenizer_from_gguf(path: str):
    """Builds the fast tokenizer a GGUF file describes, with transformers' own GGUF converters.

    The metadata is read with the ``gguf`` package (transformers' GGUF metadata reader needs torch, which
    is not a runtime dependency); the conversion itself is transformers'.
    """
    import transformers  # local: heavy (several seconds), needed only when a tokenizer is built
    from transformers.integrations.gguf import gguf_tokenizer_mapping as m

    reader = open_gguf(path)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in m.GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise CheckpointError(f"GGUF file {path} has no tokenizer vocabulary")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][int(token_id)] if token_id is not None else None
    backend, extra = m.convert_gguf_tokenizer(meta.get("general.architecture"), tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def chat_prompt_ids(tokenizer, user_messages: Sequence[str], system: Optional[str] = None,
                    enable_thinking: bool = True) -> List[List[int]]:
    """Token ids of single-turn chat prompts with the generation prompt appended. ``enable_thinking`` goes to the
    chat template (Qwen3's switch between thinking and direct answers; templates without it ignore it)."""
    out = []
    for msg in user_messages:
        conv: List[Dict[str, str]] = []
        if system is not None:
            conv.append({"role": "system", "content": system})
        conv.append({"role": "user", "content": msg})
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                            enable_thinking=bool(enable_thinking))
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
