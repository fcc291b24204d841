"""tlt-figures: every artefact from its measurement on the tiny model (--quick), the notebook drawing them all
(nbclient), and the errors for bad names and inputs."""

import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO, run_command, strict_json
from tlt_jax.bench import figures

REWARD = "--config.rl.reward=tests.rl.reward_fns:char_reward"  # a random tiny model's answers get distinct rewards


def check_rl_step_source(res):
    """What bench.rl_step writes: every mode's rows, the probes where they apply, a finite summary."""
    assert [(r["mode"], r["step"]) for r in res["rows"]] == [
        ("baseline", 1), ("tlt_base", 1), ("tlt", 1), ("tlt", 2), ("frozen", 1), ("frozen", 2)]
    for r in res["rows"]:
        assert r["rollout_s"] > 0 and r["step_s"] >= r["rollout_s"] and r["tokens"] > 0
        # the baseline has no acceptance; only the learned-drafter modes are probed
        assert (r["accept_len"] is None) == (r["mode"] == "baseline")
        assert (r["probe_accept"] is None) == (r["mode"] in ("baseline", "tlt_base"))
        assert (r["probe_initial"] is None) == (r["mode"] != "tlt")
    s = res["summary"]
    for key in ("rollout_speedup_tlt", "step_speedup_tlt", "rollout_speedup_tlt_base",
                "accept_ratio_adaptive_vs_frozen", "accept_ratio_adaptive_vs_initial",
                "rollout_accept_ratio_adaptive_vs_frozen"):
        assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, key
    assert {"pool_tlt_base", "pool_tlt", "pool_frozen"} <= set(res["extra"])


@pytest.mark.slow  # every measurement on the tiny model (rl_step's four mode processes the longest), then nbclient
def test_every_figure_quick_then_the_notebook_draws_them(tmp_path):
    out = tmp_path / "figures"
    # the measurement processes share a persistent XLA cache (a program another one compiled is loaded) and run on
    # the 2 CPU devices of the CPU configs (one per rollout replica)
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    p = run_command("tlt_jax.bench.figures", ["all", "--quick", "--out", str(out), "--seeds", "2", "--steps", "2",
                                              REWARD], env=cache, devices=2, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in figures.FIGURES:
        obj = strict_json((out / f"{name}.json").read_text())
        assert obj["figure"] == name and obj["format"] == figures.FORMAT and obj["source"]["quick"] is True
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    check_rl_step_source(strict_json((out / "sources" / "rl_step.json").read_text()))

    d = json.loads((out / "fig1.json").read_text())["data"]
    assert d["cap"] == 16 and d["steps"] == [1, 2] and all(len(x) == 4 and max(x) <= 16 for x in d["lengths"])
    assert d["max"] == [max(x) for x in d["lengths"]]
    d = json.loads((out / "fig11.json").read_text())["data"]
    assert d["modes"] == ["baseline", "tlt_base", "tlt"] and all(v > 0 for v in d["rollout_s"] + d["step_s"])
    d = json.loads((out / "fig12.json").read_text())["data"]
    assert sorted((r["mode"], r["seed"]) for r in d["runs"]) == [("baseline", 0), ("baseline", 1), ("tlt", 0),
                                                                  ("tlt", 1)]
    assert all(len(r["reward"]) == 2 for r in d["runs"]) and d["seed_spread"] >= 0 and d["max_gap"] >= 0
    d = json.loads((out / "fig13.json").read_text())["data"]
    assert d["batch"] == 1 and d["depths"] == [2, 3] and d["verify"] == [3, 4, 5, 6]
    assert d["accept_len"][0][0] >= 1.0 and d["accept_len"][0][1] is None  # 2_2_3 measured, no 2_2_4
    d = json.loads((out / "fig14.json").read_text())["data"]
    tl = d["timeline"]
    assert tl and all(c["t_end"] > c["t_start"] >= 0 and c["live_after"] <= c["live_before"] for c in tl)
    assert {c["replica"] for c in tl} == set(range(d["replicas"]))
    assert d["tokens"] == sum(c["tokens"] for c in tl) + 4  # each row's first token comes from the prefill
    d = json.loads((out / "table4.json").read_text())["data"]
    assert d["batches"] == [1, 2] and d["verify"] == [3, 4, 5, 6]
    d = json.loads((out / "table6.json").read_text())["data"]
    assert d["steps"] == [1, 2] and all(v >= 1.0 for v in d["adaptive"] + d["frozen"] + d["initial"])
    assert "| RL step | frozen | adaptive |" in p.stdout  # the tables' Markdown

    nb = nbformat.read(os.path.join(REPO, "notebooks", "paper_figures.ipynb"), as_version=4)
    os.environ["TLT_FIGURES"] = str(out)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
    finally:
        del os.environ["TLT_FIGURES"]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(figures.FIGURES)  # every figure drawn; a cell error would have raised
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{len(figures.FIGURES)} of {len(figures.FIGURES)} figures" in text and "not made yet" not in text


def test_unknown_figure_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        figures.main(["fig99", "--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "fig99" in err and all(name in err for name in figures.FIGURES)
    with pytest.raises(figures.FigureError, match="known: fig1, fig11"):
        figures.figure("fig2")


def test_inputs_of_another_benchmark_or_an_older_format_name_the_file(tmp_path, capsys):
    spec = tmp_path / "speculative.json"
    spec.write_text(json.dumps({"rows": [{"strategy": "chain-2", "batch": 1}], "verify_cost": []}))
    # the speculative benchmark's file where the rl_step benchmark's is expected: the file and the missing keys
    assert figures.main(["fig11", "--from", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "bench.rl_step" in err and "['summary', 'steps', 'adaptive_steps']" in err
    # an older speculative file: rows without keys the figure reads
    assert figures.main(["fig13", "--from", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "rows lack keys" in err and "'speedup'" in err and "'verify_tokens'" in err
    # a training work dir without metrics
    assert figures.main(["fig1", "--from", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    old = tmp_path / "fig11.json"
    old.write_text(json.dumps({"figure": "fig11", "format": 0, "data": {}}))
    with pytest.raises(figures.FigureError, match="format 0.*tlt-figures fig11"):
        figures.load(str(old))
    old.write_text(json.dumps({"rows": []}))
    with pytest.raises(figures.FigureError, match=r"not a figure's JSON: missing keys \['figure', 'format', 'data'\]"):
        figures.load(str(old))
    with pytest.raises(SystemExit) as e:  # one --from, two measurements
        figures.main(["fig11", "fig13", "--from", str(spec)])
    assert e.value.code == 2 and "make them separately" in capsys.readouterr().err


def test_tables_take_the_best_tree_per_cell_and_fig12_the_seed_spread():
    rows = [dict(strategy=s, rule="sampled", batch=b, temperature=0.7, accept_len=a, speedup=x, verify_tokens=v)
            for s, b, a, x, v in (("2_4_4", 1, 1.5, 0.9, 4), ("chain-3", 1, 1.4, 1.1, 4), ("4_4_8", 1, 2.0, 0.8, 8),
                                  ("2_4_4", 4, 1.5, 0.7, 4), ("ngram:chain-3", 1, 1.1, 2.0, 4))]
    t4 = figures.extract_table4({"rows": rows})
    assert t4["batches"] == [1, 4] and t4["verify"] == [4, 8]
    assert t4["speedup"] == [[1.1, 0.8], [0.7, None]] and t4["strategies"][0][0] == "chain-3"  # n-gram left out
    f13 = figures.extract_fig13({"rows": rows})
    assert f13["depths"] == [2, 3, 4] and f13["verify"] == [4, 8]
    assert f13["accept_len"] == [[1.5, None], [1.4, None], [None, 2.0]]
    runs = [{"mode": "baseline", "reward": [0.1, 0.2]}, {"mode": "baseline", "reward": [0.3, 0.2]},
            {"mode": "tlt", "reward": [0.2, 0.5]}]
    s = figures.extract_fig12({"runs": runs, "steps": 2})
    assert s["max_gap"] == pytest.approx(0.3) and s["seed_spread"] == pytest.approx(0.2)
