"""Qwen2.5-7B (paper scale). Point model.checkpoint at a local safetensors directory to load weights."""

from tlt_jax.app.config import arch_dict, base_config


def get_config():
    c = base_config()
    c.name = "qwen2_5_7b"
    c.model.checkpoint = "Qwen/Qwen2.5-7B"
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.arch = arch_dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
                             rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True, max_position_embeddings=32768)
    c.rollout.batch_size = 128
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 8192
    c.rollout.chunk_steps = 64
    c.mesh.fsdp = -1
    c.train.remat = True  # activations of one layer at a time in the backward pass
    return c
