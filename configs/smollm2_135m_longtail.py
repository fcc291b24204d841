"""The default job with a long tail: SmolLM2-135M-Instruct on the arithmetic task, answers of up to 512 tokens.

At T = 0.7 the initial policy's answers to the task's prompts are mostly short and a few ramble: measured with
``python -m tlt_jax.bench.lengths --config configs/smollm2_135m_longtail.py`` (README, "The long tail"), p90 / p50
is about 3 with under 5 % of the answers at the cap. Those few long answers decide a rollout's time: the batch
shrinks to a handful of live rows long before the rollout ends, the regime speculation is for.
"""

from configs.smollm2_135m import get_config as default_config


def get_config():
    c = default_config()
    c.name = "smollm2_135m_longtail"
    c.rollout.max_new_tokens = 512
    c.rollout.cache_len = 640  # prompt (<= 128) + 512: one compiled program per (bucket, arm) for every step
    c.rl.steps = 8
    return c
