"""Checkpoints survive kills: a run killed with SIGKILL and resumed ends where an uninterrupted run ends; a
checkpoint killed while being written leaves the previous one usable; a failing write is a clear error."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.multiproc import child_env
from tests.rl.test_trainer import tiny_rl_args
from tlt_jax.io import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One prompt (x 4 answers) per step: 2 rows per replica, so buckets [2, 1] and 8 compiled rollout programs, not 12.
STEPS = ["rl.steps=4", "rl.prompts_per_step=1", "train.checkpoint_every=1", "train.keep_checkpoints=5",
         "train.plots=False", "train.tensorboard=False"]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent XLA compilation cache for this module's runs. They all compile the same programs (compiling is
    most of a run's time); every run after the first loads the executables the first one compiled."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "tlt_jax.cli.train"] + tiny_rl_args(*STEPS) + ["--workdir", workdir,
                                                                                "--no-progress"] + list(extra)


def _env(xla_cache=None, **kw):
    # 2 CPU devices (what mesh.cpu_devices=2 gives the CPU configs), not the 8 of tests/conftest.py: the policy and
    # its optimizer state are still sharded (and saved shard by shard), each rollout replica has a device of its
    # own, and a step costs far less on a small host
    env = child_env(2)
    if xla_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(kw)
    return env


def _run(workdir, *extra, xla_cache=None, **env):
    p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(xla_cache, **env), capture_output=True, text=True,
                       timeout=600)
    return p


def _state(workdir, step):
    import jax

    d = os.path.join(workdir, "checkpoints")
    _, meta = checkpoint.read_metadata(d, step)
    # read back whatever was saved, shaped as saved
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(d)
    out = mngr.restore(step)
    mngr.close()
    return meta, jax.tree.map(np.asarray, {k: out[k] for k in ("policy", "opt")})


@pytest.mark.resume
def test_sigkill_then_resume_ends_with_the_uninterrupted_parameters(tmp_path, xla_cache):
    full = str(tmp_path / "full")
    p = _run(full, xla_cache=xla_cache)
    assert p.returncode == 0, p.stderr[-3000:]

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(killed), cwd=REPO, env=_env(xla_cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    target = os.path.join(killed, "checkpoints", "2")
    while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.latest_step(os.path.join(killed, "checkpoints"))
    assert done is not None and done < 4

    p = _run(killed, "--resume", xla_cache=xla_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"RL step {done}" in p.stdout
    meta_a, a = _state(full, 4)
    meta_b, b = _state(killed, 4)
    assert meta_a["step"] == meta_b["step"] == 4 and meta_a["data_pos"] == meta_b["data_pos"]
    for part in ("policy", "opt"):
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k], err_msg=f"{part}/{k}")
    lines = open(os.path.join(killed, "metrics.jsonl")).read().splitlines()
    assert [int(x.split('"step": ')[1].split(",")[0]) for x in lines] == [1, 2, 3, 4]


@pytest.mark.resume
def test_a_checkpoint_killed_while_written_leaves_the_previous_one_usable(tmp_path, xla_cache):
    wd = str(tmp_path / "w")
    p = _run(wd, xla_cache=xla_cache, TLT_KILL_DURING_SAVE="2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    ckpts = os.path.join(wd, "checkpoints")
    leftovers = [n for n in os.listdir(ckpts) if n not in ("1",)]
    assert leftovers, "the killed write left no trace: nothing was interrupted"
    assert checkpoint.latest_step(ckpts) == 1
    p = _run(wd, "--resume", xla_cache=xla_cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RL step 1" in p.stdout and checkpoint.latest_step(ckpts) == 4


@pytest.mark.resume
def test_a_write_that_hits_a_size_limit_is_a_clear_error(tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from tlt_jax.io import checkpoint
        from tlt_jax.core.errors import CheckpointError
        d = {str(tmp_path / 'ck')!r}
        checkpoint.save(d, 1, {{"w": {{"a": np.ones((16,), np.float32)}}}}, {{"step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        try:
            checkpoint.save(d, 2, {{"w": {{"a": np.random.rand(1 << 20).astype(np.float32)}}}}, {{"step": 2}})
        except CheckpointError as e:
            print("ERROR:", e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        step, items, meta = checkpoint.restore(d, {{"w": {{"a": np.zeros((16,), np.float32)}}}})
        print("LATEST", step, float(items["w"]["a"].sum()))
        import os
        print("LEFT", sorted(os.listdir(d)))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERROR: writing checkpoint step 2" in p.stdout and "a size limit was hit" in p.stdout
    assert "previous checkpoint (step 1) is intact" in p.stdout
    assert "LATEST 1 16.0" in p.stdout and "LEFT ['1']" in p.stdout  # the failed step's files are removed
