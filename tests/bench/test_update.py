"""The update benchmark on the tiny model: both layouts timed from the same state, the same parameters after."""

import pytest

from tests.helpers import strict_json
from tests.rl.test_trainer import TINY_RL
from tlt_jax.bench import update


def test_update_bench_times_both_layouts(tmp_path, capsys):
    out = tmp_path / "update.json"
    rc = update.main(["--config", "configs/tiny.py", "--reps", "2", "--json", str(out)]
                     + [f"--config.{o}" for o in TINY_RL + ["rl.minibatches=4"]])
    assert rc == 0
    res = strict_json(out.read_text())
    batch, mini = res["layouts"]["batch"], res["layouts"]["minibatch"]
    assert len(batch["widths"]) == len(mini["widths"]) == 4 and len(set(batch["widths"])) == 1
    assert all(m <= b for m, b in zip(mini["widths"], batch["widths"]))
    assert batch["skipped"] == mini["skipped"] == 0
    assert batch["pg_loss"] == pytest.approx(mini["pg_loss"], rel=1e-5, abs=1e-7)
    assert all(len(res["times_s"][k]) == 2 and min(res["times_s"][k]) > 0 for k in update.LAYOUTS)
    assert res["summary"]["speedup"] > 0 and res["summary"]["max_param_diff"] < 1e-5
    assert len(res["lengths"]) == 8 and "speedup (batch / minibatch)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        update.main(["--reps", "0"])
