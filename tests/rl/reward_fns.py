"""Reward functions the trainer tests plug in through ``rl.reward='tests.rl.reward_fns:<name>'``."""


def char_reward(answers, golds, finished):
    """Share of the answer's characters that are ASCII letters: gives a random tiny model's answers distinct
    rewards, so GRPO has a real signal to follow."""
    return [sum(c.isascii() and c.isalpha() for c in a) / max(1, len(a)) for a in answers]


def broken(answers, golds, finished):
    raise RuntimeError("this reward function always fails")


def nan_rewards(answers, golds, finished):
    return [float("nan")] * len(answers)


