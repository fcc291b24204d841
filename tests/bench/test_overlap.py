"""The replica-overlap benchmark runs each layout in its own process and writes strict JSON."""

import math

import pytest

from tests.helpers import run_command, strict_json
from tlt_jax.bench import overlap


def test_overlap_bench_runs_each_layout(tmp_path):
    out = tmp_path / "overlap.json"
    p = run_command("tlt_jax.bench.overlap", ["--layouts", "default;--xla_cpu_multi_thread_eigen=false;processes",
                                              "--reps", "1", "--size", "64", "--json", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = strict_json(out.read_text())
    assert [r["layout"] for r in res["rows"]] == ["default", "--xla_cpu_multi_thread_eigen=false", "processes"]
    for r in res["rows"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("one_s", "both_s", "both_over_one"))
        assert math.isclose(r["both_over_one"], r["both_s"] / r["one_s"])


def test_overlap_bench_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before any layout starts
        overlap.main(["--reps", "0"])
    assert e.value.code == 2 and "--reps >= 1" in capsys.readouterr().err
