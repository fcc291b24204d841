"""The answer-length benchmark on the tiny model: per-step and overall tail statistics, strict JSON out."""

import numpy as np
import pytest

from tests.helpers import strict_json
from tests.rl.test_trainer import TINY_RL
from tlt_jax.bench import lengths


def test_tail_stats():
    s = lengths.tail_stats([10] * 8 + [40, 64], cap=64)
    assert s["answers"] == 10 and s["len_p50"] == 10 and s["len_max"] == 64 and s["at_cap"] == pytest.approx(0.1)
    assert s["len_p90"] == pytest.approx(np.percentile([10] * 8 + [40, 64], 90))
    assert s["p90_over_p50"] == pytest.approx(s["len_p90"] / 10)


def test_lengths_bench_reports_every_step_and_the_whole(tmp_path, capsys):
    out = tmp_path / "lengths.json"
    rc = lengths.main(["--config", "configs/tiny.py", "--steps", "2", "--json", str(out)]
                      + [f"--config.{o}" for o in TINY_RL])
    assert rc == 0
    res = strict_json(out.read_text())
    rows, total = res["rows"], res["summary"]
    assert [r["step"] for r in rows] == [1, 2] and res["cap"] == 16
    assert total["answers"] == sum(r["answers"] for r in rows) == 2 * 2 * 4
    for r in rows + [total]:
        assert 0 <= r["len_p10"] <= r["len_p50"] <= r["len_p90"] <= r["len_max"] <= 16 and 0 <= r["at_cap"] <= 1
    assert total["len_max"] == max(r["len_max"] for r in rows)
    assert "p90 / p50" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lengths.main(["--steps", "0"])
