"""Qwen3-0.6B (dense Qwen3). Point model.checkpoint at a local safetensors directory to load weights."""

from tlt_jax.app.config import qwen3_config


def get_config():
    return qwen3_config("qwen3_0_6b", "Qwen/Qwen3-0.6B",
                        hidden_size=1024, intermediate_size=3072, num_layers=28,
                        num_heads=16, num_kv_heads=8, tie_embeddings=True)
