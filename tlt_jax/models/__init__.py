"""Decoder, KV cache and weight import."""

from tlt_jax.models.config import ModelConfig, model_config_from_hf
from tlt_jax.models.decoder import Decoder, decode, prefill, verify
from tlt_jax.models.kv_cache import KVCache, init_cache

__all__ = ["ModelConfig", "model_config_from_hf", "Decoder", "decode", "prefill", "verify", "KVCache",
           "init_cache"]
