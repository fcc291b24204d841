"""The RL-step benchmark's argument errors (its run end to end on the tiny model, every mode in its own process,
is checked by tests/bench/test_figures.py, which draws Fig 11 and Table 6 from it)."""

import pytest

from tlt_jax.bench import rl_step


def test_rl_step_bench_refuses_bad_arguments(capsys):
    for argv, msg in ((["--steps", "0"], "--steps >= 1"), (["--steps", "3", "--adaptive-steps", "2"], "--steps >= 1"),
                      (["--modes", "baseline,fast"], "unknown modes"), (["--bogus"], "unrecognised")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, before any mode starts
            rl_step.main(argv)
        assert e.value.code == 2, argv
        assert msg in capsys.readouterr().err, argv
