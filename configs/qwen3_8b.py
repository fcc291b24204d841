"""Qwen3-8B (dense Qwen3). Point model.checkpoint at a local safetensors directory to load weights."""

from tlt_jax.app.config import qwen3_config


def get_config():
    return qwen3_config("qwen3_8b", "Qwen/Qwen3-8B",
                        hidden_size=4096, intermediate_size=12288, num_layers=36,
                        num_heads=32, num_kv_heads=8, tie_embeddings=False)
