"""tlt_jax: reasoning-RL training of LLMs in JAX with lossless, adaptive speculative rollouts."""

__version__ = "0.1.0"
