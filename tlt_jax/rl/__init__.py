"""GRPO reinforcement learning: verifiable rewards, advantages and the policy loss, the trainer."""

from tlt_jax.rl.grpo import GRPOConfig, TrainBatch, group_advantages, policy_loss, update_step
from tlt_jax.rl.rewards import RewardOutput, last_boxed, math_rewards, safe_rewards

__all__ = ["GRPOConfig", "TrainBatch", "group_advantages", "policy_loss", "update_step", "RewardOutput",
           "last_boxed", "math_rewards", "safe_rewards"]
