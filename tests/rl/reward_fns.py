"""Reward functions the trainer tests plug in through ``rl.reward='tests.rl.reward_fns:<name>'``."""

from tlt_jax.rl.rewards import RewardOutput


def char_reward(answers, golds, finished):
    """Share of the answer's characters that are ASCII letters: gives a random tiny model's answers distinct
    rewards, so GRPO has a real signal to follow."""
    return [sum(c.isascii() and c.isalpha() for c in a) / max(1, len(a)) for a in answers]


def broken(answers, golds, finished):
    raise RuntimeError("this reward function always fails")


def nan_rewards(answers, golds, finished):
    return [float("nan")] * len(answers)




def parity_correct(answers, golds, finished):
    """Correct when the answer's length in characters is even: gives the evaluation tests a mix of correct and
    wrong answers from a random tiny model (whose answers rarely finish)."""
    correct = [len(a) % 2 == 0 for a in answers]
    formatted = [bool(f) for f in finished]
    return RewardOutput([float(c) for c in correct], correct, formatted, 0)
