"""The GRPO trainer end to end on the tiny model (with the real tokenizer), and its failure handling."""


import jax
import numpy as np
import pytest

from tests.helpers import strict_json as strict
from tlt_jax.app.config import load_config
from tlt_jax.app.trainer import Trainer, step_line
from tlt_jax.core.errors import CheckpointError
from tlt_jax.rl import grpo

TINY_RL = ["model.arch.vocab_size=49152", "model.tokenizer=embedded:smollm2", "rollout.max_prompt_len=128",
           "rollout.max_new_tokens=16", "rl.prompts_per_step=2", "rl.group_size=4", "rl.lr=1e-3",
           "rl.reward=tests.rl.reward_fns:char_reward"]


def test_step_line_is_strict_json():
    out = step_line({"step": 3, "drafter_loss": float("nan"), "reward_mean": 0.123456,
                     "arm_chunks": {"8:plain": 2}, "arm_tok_s": {"8:plain": 12.345678}})
    assert out.startswith("[tlt] step 3: ") and out.endswith("\n")
    assert strict(out[len("[tlt] step 3: "):]) == {"drafter_loss": None, "reward_mean": 0.1235,
                                                   "arm_chunks": {"8:plain": 2}, "arm_tok_s": {"8:plain": 12.3457}}


def tiny_rl_args(*extra):
    return ["--config", "configs/tiny.py"] + [f"--config.{o}" for o in TINY_RL + list(extra)]


def test_a_failing_reward_function_scores_zero_and_the_run_goes_on(tmp_path):
    config = load_config("tiny", TINY_RL + ["rl.steps=2", "rl.reward=tests.rl.reward_fns:broken",
                                            "train.plots=False", "train.tensorboard=False"])
    trainer = Trainer(config, str(tmp_path / "w"), log=lambda m: None)
    with pytest.warns(RuntimeWarning, match="always fails"):
        history = trainer.run(progress=False)
    assert len(history) == 2 and all(h["reward_mean"] == 0 and h["reward_errors"] == 8 for h in history)


def test_a_nan_loss_skips_the_step_with_a_warning(tmp_path, monkeypatch):
    config = load_config("tiny", TINY_RL + ["rl.steps=2", "train.plots=False", "train.tensorboard=False"])
    trainer = Trainer(config, str(tmp_path / "w"), log=lambda m: None)
    real = grpo.group_advantages
    calls = []

    def poisoned(rewards, kind="grpo", eps=1e-6):
        calls.append(1)
        adv = real(rewards, kind, eps)
        return adv * np.nan if len(calls) == 1 else adv

    monkeypatch.setattr(grpo, "group_advantages", poisoned)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(trainer.params)]
    with pytest.warns(RuntimeWarning, match="update skipped"):
        first = trainer.train_step()
    assert first["skipped_updates"] == int(config.rl.minibatches)
    for a, b in zip(before, jax.tree.leaves(trainer.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    second = trainer.train_step()  # the run goes on and updates again
    assert second["skipped_updates"] == 0 and second["step"] == 2


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from tlt_jax.io import checkpoint

    config = load_config("tiny", TINY_RL + ["rl.steps=2", "train.checkpoint_every=1", "train.plots=False",
                                            "train.tensorboard=False"])
    trainer = Trainer(config, str(tmp_path / "w"), log=lambda m: None)
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    monkeypatch.setattr(checkpoint, "disk_free_bytes", lambda path: 10_000)
    with pytest.raises(CheckpointError, match=r"not enough disk space .* step 2 .* previous checkpoint \(step 1\) "
                                              r"is intact"):
        trainer.save()
    monkeypatch.undo()
    assert checkpoint.latest_step(trainer.ckpt_dir) == 1
    resumed = Trainer(config, trainer.workdir, resume=True, log=lambda m: None)
    assert resumed.step == 1
