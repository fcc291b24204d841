"""Shared test helpers: the tiny random model of configs/tiny.py."""

import functools

from flax import nnx

from tlt_jax.config import load_config, model_config_from_arch
from tlt_jax.models import Decoder


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, dtype: str = "float32"):
    c = load_config("tiny", [f"model.dtype={dtype}", f"model.param_dtype={dtype}"])
    cfg = model_config_from_arch(c)
    return cfg, Decoder(cfg, nnx.Rngs(seed))
