"""The main job through its launch path as two joined processes (jax.distributed, gloo on 127.0.0.1): the same
result as one process over the same devices, and a dead process ends the job with a clear error."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.models.hf_tiny import make_stopping_checkpoint
from tests.multiproc import REPO_ROOT, child_env, free_port
from tlt_jax.io import checkpoint
from tlt_jax.parallel import multihost

pytestmark = pytest.mark.multihost

STOP_ID = 2  # the embedded tokenizer's end of turn


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stopping_llama"))
    make_stopping_checkpoint(path, STOP_ID, strength=8.0)
    return path


def _overrides(model_dir, *extra):
    # Answers of spread-out lengths, so one replica finishes before the other and trains the drafter; speculation
    # off (sd_threshold=0), so every decision depends on token counts only and both runs take the same ones. With
    # this seed a replica finishes early in step 2 (4 spot-training steps measured in one process).
    o = [f"model.checkpoint={model_dir}", "model.tokenizer=embedded:smollm2", "rollout.max_prompt_len=128",
         "rollout.max_new_tokens=32", "rollout.chunk_steps=4", "rl.prompts_per_step=2", "rl.group_size=4",
         "rl.lr=1e-3", "rl.kl_coef=0.05", "rl.reward=tests.rl.reward_fns:char_reward", "rl.steps=2",
         "tlt.replicas=2", "tlt.sd_threshold=0", "tlt.spot_rows=2", "tlt.spot_seq_len=64", "mesh.fsdp=-1",
         "train.plots=False", "train.tensorboard=False", "seed=1"] + list(extra)
    return [f"--config.{x}" for x in o]


def _env():
    env = child_env(8)
    env.pop("XLA_FLAGS", None)  # the device count comes from --local-devices
    env["PYTHON"] = sys.executable
    return env


def _local_sh(workdir, processes, local_devices, overrides, timeout=600, pin=False):
    cmd = ["bash", "launch/local.sh", "configs/tiny.py", workdir, "--processes", str(processes), "--local-devices",
           str(local_devices), "--no-progress"] + (["--pin-cores"] if pin else []) + overrides
    return subprocess.run(cmd, cwd=str(REPO_ROOT), env=_env(), capture_output=True, text=True, timeout=timeout)


def _state(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    step, policy = checkpoint.read_host_arrays(ckpt, "policy")
    _, drafter = checkpoint.read_host_arrays(ckpt, "drafter", step)
    return step, policy, drafter


def test_two_processes_train_like_one(tmp_path, stopping_model):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    t0 = time.monotonic()
    r2 = _local_sh(two, 2, 1, _overrides(stopping_model), pin=True)  # one replica per process, on its own core
    t_two = time.monotonic() - t0
    assert r2.returncode == 0, r2.stderr[-4000:]
    cores = multihost.core_sets(2)
    assert f"process 0 of 2: 1 local of 2 cpu devices, on cores {cores[0]} of its own" in r2.stdout
    # the launcher tags process 1
    assert f"[p1] [tlt] process 1 of 2: 1 local of 2 cpu devices, on cores {cores[1]} of its own" in r2.stdout
    r1 = _local_sh(one, 1, 2, _overrides(stopping_model))
    assert r1.returncode == 0, r1.stderr[-4000:]

    rows2 = [json.loads(x) for x in open(os.path.join(two, "metrics.jsonl"))]
    rows1 = [json.loads(x) for x in open(os.path.join(one, "metrics.jsonl"))]
    assert [r["step"] for r in rows2] == [1, 2]  # one metrics file, written once (by process 0)
    assert sum(r["spot_steps"] for r in rows2) > 0  # a finished replica trained the drafter
    for a, b in zip(rows1, rows2):
        for key in ("rollout_tokens", "reward_mean", "spot_steps", "chunks", "pg_loss", "grad_norm", "drafter_loss",
                    "drafter_top1"):
            np.testing.assert_equal(a[key], b[key], err_msg=key)  # (null before the first drafter step)
    s1, policy1, drafter1 = _state(one)
    s2, policy2, drafter2 = _state(two)
    assert s1 == s2 == 2
    for name, x in policy1.items():  # the policy was sharded (FSDP) over both processes' devices
        np.testing.assert_array_equal(policy2[name], x, err_msg=f"policy {name}")
    for name, x in drafter1.items():  # the drafter trained on the idle replica, averaged at the step barrier
        np.testing.assert_array_equal(drafter2[name], x, err_msg=f"drafter {name}")
    print(f"two processes: {t_two:.0f}s")


def test_a_dead_process_ends_the_job_with_a_clear_error(tmp_path, stopping_model):
    # Started the way a pod or a cluster starts them: each process on its own, told its place in the job.
    port = free_port()
    cmd = [sys.executable, "-m", "tlt_jax.cli.train", "--config", "configs/tiny.py", "--workdir",
           str(tmp_path / "run"), "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--local-devices", "1", "--dist-timeout", "20"] + _overrides(stopping_model, "rl.steps=50")
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=str(REPO_ROOT), env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        # let process 1 get into the training loop, then kill it
        deadline = time.monotonic() + 300
        for line in procs[1].stdout:
            if "adaptive engine" in line or time.monotonic() > deadline:
                break
        time.sleep(2.0)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert waited < 90, waited  # it did not hang
    text = err.replace("\n", " ")
    clear = ("error: process 0 of 2 lost contact with the other processes" in text
             or "another task died" in text or "tasks are unhealthy" in text)
    assert clear, err[-3000:]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sbatch"])
def test_cluster_scripts_start_the_job_with_cluster_detection(script):
    pre = ["my-tpu", "us-central2-b", "run"] if script == "tpu_pod.sh" else []
    args = pre + ["configs/qwen2_5_7b.py", "/shared/runs/q 7", "--resume", "--config.rl.steps=5"]
    r = subprocess.run(["bash", f"launch/{script}"] + args, cwd=str(REPO_ROOT), capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1"), timeout=30)
    assert r.returncode == 0, r.stderr
    out = r.stdout.replace("\\ ", " ")
    assert "-m tlt_jax.cli.train --distributed" in out and "--config configs/qwen2_5_7b.py" in out
    assert "/shared/runs/q" in out and "--resume" in out and "--config.rl.steps=5" in out
    if script == "tpu_pod.sh":
        assert "--worker=all" in out  # the same command on every worker of the slice
    else:
        assert out.startswith("srun --kill-on-bad-exit=1")  # a failed node stops the others
    bad = subprocess.run(["bash", f"launch/{script}"] + pre[:2], cwd=str(REPO_ROOT), capture_output=True, text=True,
                         env=dict(os.environ, DRY_RUN="1"), timeout=30)
    assert bad.returncode != 0 and "usage:" in bad.stderr
