"""GRPO reinforcement learning: verifiable rewards, advantages and the policy loss, the RL step, held-out
evaluation with unbiased pass@k, the checkpoint layout of a run, plots."""

from tlt_jax.rl.grpo import GRPOConfig, TrainBatch, group_advantages, policy_loss, update_step
from tlt_jax.rl.rewards import RewardOutput, math_rewards, safe_rewards

__all__ = ["GRPOConfig", "TrainBatch", "group_advantages", "policy_loss", "update_step", "RewardOutput",
           "math_rewards", "safe_rewards"]
