"""Rollout: sampling, plain decode chunks, and lossless speculative chunks (chain or EAGLE-2 tree)."""

from tlt_jax.rollout.decode import (RolloutResult, RolloutSpec, RolloutState, decode_chunk, generate,
                                    pad_prompts, start_rollout)
from tlt_jax.rollout.sampling import SamplingParams, sample, sampling_logprobs
from tlt_jax.rollout.speculative import (SpecResult, SpecState, SpeculativeSpec, generate_speculative,
                                         speculative_chunk, start_speculative)
from tlt_jax.rollout.tree import SpecStrategy

__all__ = ["RolloutResult", "RolloutSpec", "RolloutState", "decode_chunk", "generate", "pad_prompts",
           "start_rollout", "SamplingParams", "sample", "sampling_logprobs", "SpecResult", "SpecState",
           "SpeculativeSpec", "SpecStrategy", "generate_speculative", "speculative_chunk", "start_speculative"]
