"""Rollout: sampling, plain decode chunks (and, later, speculative chunks)."""

from tlt_jax.rollout.decode import (RolloutResult, RolloutSpec, RolloutState, decode_chunk, generate,
                                    pad_prompts, start_rollout)
from tlt_jax.rollout.sampling import SamplingParams, sample, sampling_logprobs

__all__ = ["RolloutResult", "RolloutSpec", "RolloutState", "decode_chunk", "generate", "pad_prompts",
           "start_rollout", "SamplingParams", "sample", "sampling_logprobs"]
