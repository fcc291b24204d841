"""The commands end to end, each run as a user runs it (its own process): the main job (GRPO) on the embedded
and the tiny model, tlt-generate, tlt-warmup (after the main job, on its data), tlt-eval, tlt-inspect,
tlt-launch, and their one-line errors."""

import glob
import json
import os
import sys
import time

import pytest

from tests.helpers import run_command
from tests.helpers import strict_json as strict
from tests.rl.test_trainer import tiny_rl_args
from tlt_jax.io.drafter import load_drafter
from tlt_jax.io.weights import load_checkpoint


def train_main(args, env=None, devices=0):
    """tlt-train ARGS: (exit status, stdout, stderr)."""
    p = run_command("tlt_jax.cli.train", args, env=env, devices=devices)
    return p.returncode, p.stdout, p.stderr


# the warm-up's data and drafter settings at toy sizes, shared by the main job's first-run warm-up and the
# tlt-warmup run after it (the same settings: the command reuses the job's answers)
TOY_WARMUP = ["--config.drafter.warmup.max_new_tokens=12", "--config.drafter.warmup.gen_batch=4",
              "--config.drafter.warmup.seq_len=128", "--config.drafter.warmup.eval_prompts=2",
              "--config.drafter.draft_vocab=512"]


@pytest.mark.slow
def test_main_job_trains_the_embedded_model(tmp_path):
    wd = tmp_path / "run"
    # The smallest main job: one prompt x 2 answers over the 2 replicas is one row each, so one bucket, and the one
    # arm (chain-2 with the learned drafter, no plain arm) speculates from the first chunk: 2 compiled rollout
    # programs of the 30-layer model where the config's arms at batch 4 compile 12 (most of this test's time).
    # No warmed drafter (drafter.checkpoint names an empty place), so the job first warms its own, at toy sizes.
    rc, out, err = train_main(["--config", "configs/smollm2_135m.py", "--workdir", str(wd), "--no-progress",
                               "--config.rl.steps=1", "--config.rl.prompts_per_step=1", "--config.rl.group_size=2",
                               "--config.rollout.max_new_tokens=16", "--config.rl.minibatches=1",
                               "--config.train.plots=False", "--config.train.tensorboard=False",
                               "--config.tlt.arms=('chain-2',)", "--config.tlt.plain_arm=False",
                               f"--config.drafter.checkpoint={tmp_path / 'no_drafter'}",
                               "--config.tlt.warmup_prompts=4", "--config.tlt.warmup_steps=3"] + TOY_WARMUP)
    assert rc == 0, err[-3000:]
    assert "a short warm-up first (4 prompts, 3 steps" in out and "held-out acceptance" in out
    assert "TLT: speculative rollouts, chain-4 with the eagle proposer" in out and "done: 1 steps" in out
    row = json.loads((wd / "metrics.jsonl").read_text())
    assert row["rollout_tokens"] > 0 and row["accept_len"] >= 1.0 and row["time_update"] > 0
    assert row["drafter_proposes"] == 1.0  # the learned drafter drafts from the first rollout
    assert (wd / "checkpoints" / "1").is_dir() and (wd / "drafter").is_dir()
    # tlt-warmup at the same toy settings into the run's drafter directory: the command reuses the answers the
    # job's warm-up generated (same target, task and data settings), trains, checks and saves
    p = run_command("tlt_jax.cli.warmup", [
        "--config", "configs/smollm2_135m.py", "--out", str(wd / "drafter"),
        "--config.drafter.warmup.num_prompts=4", "--config.drafter.warmup.steps=3",
        "--config.drafter.warmup.batch_size=2", "--config.drafter.warmup.eval_temperatures=(0.0,)"] + TOY_WARMUP)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "reusing 4 answers" in p.stdout and "acceptance length" in p.stdout and "saved drafter" in p.stdout
    _, model = load_checkpoint("embedded:smollm2")
    drafter, meta = load_drafter(str(wd / "drafter"), model)
    assert drafter.draft_vocab_size == 512
    assert meta["extra"]["accept_len_chain4_greedy"] >= 1.0


@pytest.mark.slow
def test_generate_answers_prompts(tmp_path):
    out = tmp_path / "answers.json"
    p = run_command("tlt_jax.cli.generate", ["--config", "configs/smollm2_135m.py",
                                             "--config.rollout.max_new_tokens=12", "--prompt", "What is 2 + 2?",
                                             "--prompt", "Say hello.", "--json", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout
    assert ">>> What is 2 + 2?" in text and "tokens/s" in text
    data = json.loads(out.read_text())
    assert len(data["answers"]) == 2 and all(1 <= n <= 12 for n in data["lengths"])
    assert data["tokens_per_s"] > 0


def test_inspect_cli(tmp_path):
    out = tmp_path / "r.json"
    p = run_command("tlt_jax.cli.inspect_model", ["--config", "configs/llama3_3_70b.py", "--config.mesh.tensor=2",
                                                  "--json", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num_params"] == 70_553_706_496
    assert "GiB" in p.stdout


def test_inspect_cli_mesh_does_not_fit():
    p = run_command("tlt_jax.cli.inspect_model", ["--config", "configs/tiny.py", "--config.mesh.data=3"])
    assert p.returncode == 2
    assert "do not divide" in p.stderr


def test_cli_reports_config_errors():
    p = run_command("tlt_jax.cli.generate", ["--config", "configs/tiny.py", "--config.rollout.top_p=2"])
    assert p.returncode == 2
    assert "rollout.top_p must be in (0, 1]" in p.stderr
    p = run_command("tlt_jax.cli.generate", ["--config", "configs/tiny.py", "--config.nope=1"])
    assert p.returncode == 2
    assert "unknown config key 'nope'" in p.stderr


def test_a_short_run_logs_checkpoints_and_plots(tmp_path):
    wd = str(tmp_path / "run")
    # 2 answers per prompt: 2 rows per replica, so buckets [2, 1]; without the plain arm the group proposer drafts
    # every chunk: 4 compiled rollout programs where 4 rows per replica and two arms compile 12
    small = ["rl.group_size=2", "tlt.plain_arm=False"]
    # one persistent XLA cache for the four commands (the later ones load the programs the first compiled), each on
    # the CPU configs' 2 devices (one per rollout replica)
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    rc, out, err = train_main(tiny_rl_args("rl.steps=3", *small) + ["--workdir", wd, "--no-progress"], cache, devices=2)
    assert rc == 0, err[-3000:]
    assert "model-free arms" in out and "done: 3 steps" in out
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
    rc, out, err = train_main(tiny_rl_args("rl.steps=3", *small) + ["--workdir", wd], cache, devices=2)
    assert rc == 2
    assert "already holds a run" in err
    # --resume of a finished run has nothing to do; more steps continue it
    rc, out, err = train_main(tiny_rl_args("rl.steps=4", *small) + ["--workdir", wd, "--resume", "--no-progress"],
                              cache, devices=2)
    assert rc == 0, err[-3000:]
    assert "resumed from" in out
    assert [json.loads(x)["step"] for x in open(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3, 4]
    # tlt-eval of the newest checkpoint through the run's own rollout (the adaptive engine, the run's drafter)
    p = run_command("tlt_jax.cli.evaluate", tiny_rl_args(*small, "eval.limit=2", "eval.samples=2")
                    + ["--checkpoint", wd, "--no-progress"], env=cache, devices=2)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("[tlt] eval step 4: ")][0]
    summary = strict(line[len("[tlt] eval step 4: "):])
    assert summary["problems"] == 2 and summary["accept_len"] >= 1.0 and 0 <= summary["pass@2"] <= 1
    assert len(open(os.path.join(wd, "eval", "4.jsonl")).readlines()) == 2
    assert os.path.exists(os.path.join(wd, "plots", "eval.png"))


def test_baseline_switch_runs_plain_rollouts(tmp_path):
    wd = str(tmp_path / "base")
    rc, out, err = train_main(tiny_rl_args("rl.steps=1", "tlt.enable=False", "train.plots=False")
                              + ["--workdir", wd, "--no-progress"], devices=2)
    assert rc == 0, err[-3000:]
    assert "baseline: plain rollouts" in out
    row = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
    assert "accept_len" not in row and row["rollout_tokens"] > 0


def launch_main(args):
    """tlt-launch ARGS: (exit status, stdout, stderr)."""
    p = run_command("tlt_jax.cli.launch", args, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_launcher_reports_the_first_failure_and_stops_the_rest():
    script = ("import os, sys, time\n"
              "pid = int(os.environ['TLT_PROCESS_ID'])\n"
              "print('process', pid, 'of', os.environ['TLT_NUM_PROCESSES'], 'at', os.environ['TLT_COORDINATOR'])\n"
              "sys.exit(5) if pid == 1 else time.sleep(120)\n")
    t0 = time.monotonic()
    rc, out, err = launch_main(["--processes", "3", "--grace", "1", "--", sys.executable, "-c", script])
    assert rc == 5
    assert time.monotonic() - t0 < 60
    assert "process 0 of 3 at 127.0.0.1:" in out and "[p2] process 2 of 3" in out
    assert "process 1 exited with status 5; the others have 1s to stop on their own" in err
    assert "stopping process 0" in err and "stopping process 2" in err
    assert launch_main(["--processes", "2", "--", sys.executable, "-c", "pass"])[0] == 0
    rc, out, err = launch_main(["--processes", "2"])
    assert rc == 2 and "no command to launch" in err
