"""Llama-3.3-70B (paper scale; Llama-3 RoPE scaling)."""

from tlt_jax.app.config import arch_dict, base_config


def get_config():
    c = base_config()
    c.name = "llama3_3_70b"
    c.model.checkpoint = "meta-llama/Llama-3.3-70B-Instruct"
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.arch = arch_dict(architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                             num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                             rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                             max_position_embeddings=131072)
    c.model.arch.rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192)
    c.rollout.batch_size = 64
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 16384
    c.rollout.chunk_steps = 64
    c.rollout.stop_strings = ("<|eot_id|>",)
    c.mesh.tensor = 4
    c.train.remat = True  # activations of one layer at a time in the backward pass
    c.tlt.replica_tensor = 4  # rollout replicas split the model over 4 devices
    return c
