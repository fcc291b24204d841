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
    # Four mini-batches of 4 answers: the update of 8 answers x (128 + 512) tokens needs 19.3 GB of temporaries
    # (XLA's memory analysis; the attention scores of every layer dominate, and train.remat saves under 1 GB of
    # it on this backend), which with the rollout engine's programs did not fit a 24 GB host; 4 answers need 9.8.
    c.rl.minibatches = 4
    return c
