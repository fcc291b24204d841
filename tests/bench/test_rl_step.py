"""The RL-step benchmark end to end on the tiny model: every mode in its own process, strict JSON out."""

import math

import pytest
from flax import nnx

from tests.helpers import run_command, strict_json
from tests.rl.test_trainer import TINY_RL
from tlt_jax.app.build import model_from_config
from tlt_jax.app.config import load_config
from tlt_jax.bench import rl_step
from tlt_jax.io.drafter import save_drafter
from tlt_jax.models.drafter import Drafter

# 2 answers per prompt, no plain arm, one learned-drafter arm: few compiled programs; 16 new tokens
SMALL = TINY_RL + ["rl.group_size=2", "tlt.plain_arm=False", "tlt.arms=('chain-2',)"]


@pytest.mark.slow  # four training processes, one per mode (about 90 s)
def test_rl_step_bench_runs_every_mode_and_writes_strict_json(tmp_path):
    # a (random) drafter for the tiny target stands in for the warm-up's: the TLT modes refuse to run without one
    ddir = str(tmp_path / "drafter")
    _, model = model_from_config(load_config("tiny", SMALL), None)
    save_drafter(ddir, Drafter(model.cfg, nnx.Rngs(0)), model)
    out = tmp_path / "rl_step.json"
    # run from the repository root: the mode processes load configs/ and tests.rl.reward_fns from there
    argv = ["--config", "configs/tiny.py", "--steps", "1", "--adaptive-steps", "1", "--overhead-reps", "1",
            "--json", str(out)] + [f"--config.{o}" for o in SMALL + [f"drafter.checkpoint={ddir}"]]
    # the mode processes share a persistent XLA cache: a program another mode compiled is loaded, not recompiled
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    p = run_command("tlt_jax.bench.rl_step", argv, env=cache)
    assert p.returncode == 0, p.stderr[-3000:]
    res = strict_json(out.read_text())
    assert [(r["mode"], r["step"]) for r in res["rows"]] == [
        ("baseline", 1), ("tlt_base", 1), ("tlt", 1), ("frozen", 1)]
    for r in res["rows"]:
        assert r["rollout_s"] > 0 and r["step_s"] >= r["rollout_s"] and r["tokens"] > 0
        # the baseline has no acceptance; only the learned-drafter modes are probed
        assert (r["accept_len"] is None) == (r["mode"] == "baseline")
        assert (r["probe_accept"] is None) == (r["mode"] in ("baseline", "tlt_base"))
        assert (r["probe_initial"] is None) == (r["mode"] != "tlt")
    s = res["summary"]
    for key in ("rollout_speedup_tlt", "step_speedup_tlt", "rollout_speedup_tlt_base",
                "accept_ratio_adaptive_vs_frozen", "accept_ratio_adaptive_vs_initial",
                "rollout_accept_ratio_adaptive_vs_frozen", "spot_overhead"):
        assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, key
    assert {"pool_tlt_base", "pool_tlt", "pool_frozen"} <= set(res["extra"])
    assert "rollout_speedup_tlt_base" in p.stdout


def test_rl_step_bench_refuses_bad_arguments(capsys):
    for argv, msg in ((["--steps", "0"], "--steps >= 1"), (["--steps", "3", "--adaptive-steps", "2"], "--steps >= 1"),
                      (["--modes", "baseline,fast"], "unknown modes"), (["--bogus"], "unrecognised")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, before any mode starts
            rl_step.main(argv)
        assert e.value.code == 2, argv
        assert msg in capsys.readouterr().err, argv
