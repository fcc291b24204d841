"""The drafter in the EAGLE-1 layout that serving engines load next to its target (a deployable by-product).

A directory with:

* ``config.json``: the target's architecture with one hidden layer (``num_hidden_layers: 1``),
  ``architectures: [<Family>ForCausalLMEagle]`` (the class name SGLang registers for EAGLE-1 drafters of Llama
  and Qwen2 targets), ``bias: true`` (the ``fc`` projection has a bias, as in EAGLE-1), ``tie_word_embeddings:
  false``, and an ``eagle`` section (the target's depth, the draft vocabulary size, the token map file);
* ``model.safetensors``: ``fc.weight`` [H, 2H] over [token embedding; target feature] and ``fc.bias``, the one
  decoder layer as ``layers.0.*`` under Hugging Face names (no ``input_layernorm``: EAGLE-1 feeds ``fc``'s output
  to attention directly), the target's embedding as ``embed_tokens.weight`` and the LM head the drafter proposes
  from as ``lm_head.weight``: the target's rows of the draft vocabulary (``hot_vocab_size`` of them) or the whole
  head;
* ``token_map.json`` when there is a draft vocabulary: the token id of each ``lm_head`` row (engines with a
  hot-token map, e.g. SGLang's ``--speculative-token-map``, take these ids in their own file format).

Weights are stored in float32. :func:`load_eagle` reads such a directory back into a :class:`Drafter`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List

import jax
import numpy as np
from flax import nnx

from tlt_jax.core.errors import CheckpointError
from tlt_jax.core.trees import path_name
from tlt_jax.io.weights import SafetensorsFile
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter

ARCHITECTURES = {"llama": "LlamaForCausalLMEagle", "qwen2": "Qwen2ForCausalLMEagle",
                 "qwen3": "Qwen3ForCausalLMEagle"}
WEIGHTS = "model.safetensors"
TOKEN_MAP = "token_map.json"


def eagle_name(path: str):
    """Our drafter parameter path -> (EAGLE tensor name, stored transposed), e.g. ``layer.mlp.up_proj.kernel`` ->
    (``layers.0.mlp.up_proj.weight``, True)."""
    name = "layers.0." + path[len("layer."):] if path.startswith("layer.") else path
    if name.endswith(".kernel"):
        return name[:-len(".kernel")] + ".weight", True
    return name, False


def _drafter_tensors(drafter: Drafter) -> Dict[str, np.ndarray]:
    _, params, _ = nnx.split(drafter, nnx.Param, ...)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name, transposed = eagle_name(path_name(path))
        x = np.asarray(jax.device_get(leaf), np.float32)
        out[name] = np.ascontiguousarray(x.T if transposed else x)
    return out


def eagle_config(drafter: Drafter, target: Decoder) -> Dict:
    cfg = target.cfg
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    return {
        "architectures": [ARCHITECTURES[cfg.architecture]], "model_type": cfg.architecture,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "hot_vocab_size": drafter.draft_vocab_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": float(cfg.rope_theta), "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": False,
        "attention_bias": cfg.qkv_bias, "bias": True, "torch_dtype": "float32",
        "eagle": {"version": 1, "target_num_hidden_layers": cfg.num_layers,
                  "draft_vocab_size": drafter.draft_vocab_size,
                  "token_map": TOKEN_MAP if drafter.vocab_ids is not None else None},
    }


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """A .safetensors file of float32 / int32 arrays (header, then the raw little-endian data)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name in sorted(tensors):
        x = np.ascontiguousarray(tensors[name])
        data = x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": codes[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def export_eagle(out: str, drafter: Drafter, target: Decoder) -> List[str]:
    """Writes the drafter for ``target`` into ``out`` (created); returns the files written."""
    os.makedirs(out, exist_ok=True)
    tensors = _drafter_tensors(drafter)
    tensors["embed_tokens.weight"] = np.asarray(jax.device_get(target.embed_tokens.embedding[...]), np.float32)
    tensors["lm_head.weight"] = np.asarray(jax.device_get(drafter.head_weight(target)), np.float32)
    write_safetensors(os.path.join(out, WEIGHTS), tensors, {"format": "pt"})
    files = [WEIGHTS, "config.json"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(eagle_config(drafter, target), f, indent=1)
    token_map = os.path.join(out, TOKEN_MAP)
    if drafter.vocab_ids is not None:
        with open(token_map, "w") as f:
            json.dump([int(i) for i in np.asarray(drafter.vocab_ids[...])], f)
        files.append(TOKEN_MAP)
    elif os.path.exists(token_map):
        os.remove(token_map)  # a stale map of an earlier export into the same directory
    return [os.path.join(out, f) for f in files]


def load_eagle(directory: str, target: Decoder) -> Drafter:
    """The drafter of an :func:`export_eagle` directory, for ``target`` (its shapes and embedding must match)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not an EAGLE drafter export (no config.json)")
    with open(path) as f:
        conf = json.load(f)
    cfg = target.cfg
    want = {"model_type": cfg.architecture, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "intermediate_size": cfg.intermediate_size}
    diff = [f"{k}: {conf.get(k)!r} vs the target's {v!r}" for k, v in want.items() if conf.get(k) != v]
    if diff:
        raise CheckpointError(f"{directory} holds a drafter for another target ({'; '.join(diff)})")
    st = SafetensorsFile(os.path.join(directory, WEIGHTS))
    emb = np.asarray(jax.device_get(target.embed_tokens.embedding[...]), np.float32)
    if not np.allclose(st.get("embed_tokens.weight"), emb, rtol=1e-6, atol=1e-6):
        raise CheckpointError(f"{directory} holds a drafter for another target of the same shape (embedding differs)")
    vocab = None
    if (conf.get("eagle") or {}).get("token_map"):
        with open(os.path.join(directory, conf["eagle"]["token_map"])) as f:
            vocab = np.asarray(json.load(f), np.int32)
    drafter = Drafter(cfg, nnx.Rngs(0), draft_vocab=vocab)
    graphdef, params, rest = nnx.split(drafter, nnx.Param, ...)

    def fetch(path, leaf):
        name, transposed = eagle_name(path_name(path))
        if name not in st.keys():
            raise CheckpointError(f"tensor {name} is missing from {directory}/{WEIGHTS}")
        x = np.asarray(st.get(name))
        x = x.T if transposed else x
        if x.shape != leaf.shape:
            raise CheckpointError(f"tensor {name} in {directory}: shape {x.shape}, the drafter's is {leaf.shape}")
        return jax.numpy.asarray(x, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fetch, params)
    return nnx.merge(graphdef, params, rest)
