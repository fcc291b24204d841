"""The GRPO trainer end to end on the tiny model (with the real tokenizer), and its failure handling."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from tests.helpers import strict_json as strict
from tlt_jax.cli import train as train_cli
from tlt_jax.config import load_config
from tlt_jax.errors import CheckpointError
from tlt_jax.rl import grpo
from tlt_jax.rl.trainer import Trainer

TINY_RL = ["model.arch.vocab_size=49152", "model.tokenizer=embedded:smollm2", "rollout.max_prompt_len=128",
           "rl.max_new_tokens=16", "rl.prompts_per_step=2", "rl.group_size=4", "rl.lr=1e-3",
           "rl.reward=tests.rl.reward_fns:char_reward"]


def test_step_line_is_strict_json(capsys):
    train_cli._print_step({"step": 3, "drafter_loss": float("nan"), "reward_mean": 0.123456,
                           "arm_chunks": {"8:plain": 2}})
    out = capsys.readouterr().out
    assert out.startswith("[tlt] step 3: ") and out.endswith("\n")
    assert strict(out[len("[tlt] step 3: "):]) == {"drafter_loss": None, "reward_mean": 0.1235,
                                                   "arm_chunks": {"8:plain": 2}}


def tiny_rl_args(*extra):
    return ["--config", "configs/tiny.py"] + [f"--config.{o}" for o in TINY_RL + list(extra)]


def test_a_short_run_logs_checkpoints_and_plots(tmp_path, capsys):
    wd = str(tmp_path / "run")
    # 2 answers per prompt: 2 rows per replica, so buckets [2, 1]; without the plain arm the n-gram proposer drafts
    # every chunk: 4 compiled rollout programs where 4 rows per replica and two arms compile 12
    small = ["rl.group_size=2", "tlt.plain_arm=False"]
    assert train_cli.main(tiny_rl_args("rl.steps=3", *small) + ["--workdir", wd, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "n-gram proposer" in out and "done: 3 steps" in out
    rows = [strict(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "accuracy", "len_p50", "len_p75", "len_p90", "len_max", "time_rollout",
                "time_reward", "time_logprob", "time_update", "tokens_per_s", "accept_len", "entropy", "kl"):
        assert all(key in r for r in rows), key
    assert rows[0]["reward_std"] > 0  # the test reward gives GRPO a signal
    samples = [strict(x) for x in open(os.path.join(wd, "samples.jsonl"))]
    assert len(samples) == 3 * 2 and {"question", "gold", "answer", "reward"} <= set(samples[0])
    assert glob.glob(os.path.join(wd, "tb", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(wd, "plots"))) == ["lengths.png", "reward.png", "time_split.png"]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
    # the same work dir again without --resume: refused, nothing overwritten
    assert train_cli.main(tiny_rl_args("rl.steps=3", *small) + ["--workdir", wd]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # --resume of a finished run has nothing to do; more steps continue it
    assert train_cli.main(tiny_rl_args("rl.steps=4", *small) + ["--workdir", wd, "--resume", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in open(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_baseline_switch_runs_plain_rollouts(tmp_path, capsys):
    wd = str(tmp_path / "base")
    assert train_cli.main(tiny_rl_args("rl.steps=1", "tlt.enable=False", "train.plots=False")
                          + ["--workdir", wd, "--no-progress"]) == 0
    assert "baseline: plain rollouts" in capsys.readouterr().out
    row = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
    assert "accept_len" not in row and row["rollout_tokens"] > 0


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
    from tlt_jax import checkpoint

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
