"""Rollout: sampling, plain decode chunks, lossless speculative chunks (chain or EAGLE-2 tree), and the one
rollout interface (``rollout.host``: ``Rollout.generate(params, prompts, seed=...) -> RolloutOutput``)."""

from tlt_jax.rollout.decode import RolloutSpec, RolloutState, pad_prompts
from tlt_jax.rollout.host import (DrafterInput, PlainRollout, Rollout, RolloutOutput, SpeculativeRollout,
                                  generate)
from tlt_jax.rollout.sampling import SamplingParams, sample, sampling_logprobs
from tlt_jax.rollout.speculative import SpecState, SpeculativeSpec
from tlt_jax.rollout.tree import SpecStrategy

__all__ = ["RolloutSpec", "RolloutState", "pad_prompts", "DrafterInput", "PlainRollout", "Rollout", "RolloutOutput",
           "SpeculativeRollout", "generate", "SamplingParams", "sample", "sampling_logprobs", "SpecState",
           "SpeculativeSpec", "SpecStrategy"]
