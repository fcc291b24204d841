"""A random tiny model, for tests and quick experiments."""

from tlt_jax.app.config import arch_dict, base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.arch = arch_dict(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                             rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=False,
                             max_position_embeddings=1024)
    c.rollout.batch_size = 4
    c.rollout.max_prompt_len = 32
    c.rollout.max_new_tokens = 32
    c.rollout.chunk_steps = 8
    c.rollout.stop_strings = ()
    c.job.prompts = ()
    return c
