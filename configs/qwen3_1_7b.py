"""Qwen3-1.7B (dense Qwen3). Point model.checkpoint at a local safetensors directory to load weights."""

from tlt_jax.app.config import qwen3_config


def get_config():
    return qwen3_config("qwen3_1_7b", "Qwen/Qwen3-1.7B",
                        hidden_size=2048, intermediate_size=6144, num_layers=28,
                        num_heads=16, num_kv_heads=8, tie_embeddings=True)
