"""DeepSeek-R1-Distill-Qwen-7B (paper scale; Qwen2 architecture)."""

from tlt_jax.app.config import arch_dict, base_config


def get_config():
    c = base_config()
    c.name = "r1_distill_qwen_7b"
    c.model.checkpoint = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.arch = arch_dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=10000.0,
                             rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True,
                             max_position_embeddings=131072)
    c.rollout.batch_size = 128
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 16384
    c.rollout.chunk_steps = 64
    c.rollout.stop_strings = ("<｜end▁of▁sentence｜>",)
    c.train.remat = True  # activations of one layer at a time in the backward pass
    return c
