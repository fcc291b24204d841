"""Architecture description of a decoder-only model (Llama, Qwen2 and dense Qwen3 families)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from tlt_jax.core.errors import ConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def to_dtype(name: Any):
    """Maps a dtype name (or dtype) to a jnp dtype, with a clear error."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a decoder. Hashable, so it can be a jit static argument."""

    architecture: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on each query and key head, before RoPE
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            if int(getattr(self, field)) <= 0:
                raise ConfigError(f"model.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        to_dtype(self.param_dtype)
        to_dtype(self.dtype)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def jnp_dtype(self):
        return to_dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return to_dtype(self.param_dtype)

    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm
                                                                                     else 0)
        block = attn + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * block + h

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def model_config_from_hf(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face ``config.json`` dictionary."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window", False):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
    if cfg.get("mlp_bias", False):
        raise UnsupportedModelError("Llama with mlp_bias=True is not supported")
    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UnsupportedModelError(f"hidden_act {hidden_act!r} is not supported (only silu)")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # transformers >= 5 keeps rope settings under rope_parameters; older files use rope_theta / rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        rope.update(cfg["rope_scaling"])
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (default, llama3)")
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    kw = dict(
        architecture=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )
    kw.update(overrides)
    return ModelConfig(**kw)
