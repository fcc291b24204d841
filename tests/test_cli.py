"""The commands end to end: the main job (GRPO) and tlt-generate on the embedded model, tlt-inspect."""

import json

import pytest

from tlt_jax.cli.generate import main as generate_main
from tlt_jax.cli.inspect_model import main as inspect_main
from tlt_jax.cli.train import main as train_main


@pytest.mark.slow
def test_main_job_trains_the_embedded_model(tmp_path, capsys):
    wd = tmp_path / "run"
    # The smallest main job: one prompt x 2 answers over the 2 replicas is one row each, so one bucket, and the one
    # arm (chain-2 with the learned drafter, no plain arm) speculates from the first chunk: 2 compiled rollout
    # programs of the 30-layer model where the config's arms at batch 4 compile 12 (most of this test's time).
    rc = train_main(["--config", "configs/smollm2_135m.py", "--workdir", str(wd), "--no-progress",
                     "--config.rl.steps=1", "--config.rl.prompts_per_step=1", "--config.rl.group_size=2",
                     "--config.rl.max_new_tokens=16", "--config.rl.minibatches=1", "--config.train.plots=False",
                     "--config.train.tensorboard=False", "--config.tlt.arms=('chain-2',)",
                     "--config.tlt.plain_arm=False"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TLT: speculative rollouts" in out and "done: 1 steps" in out
    row = json.loads((wd / "metrics.jsonl").read_text())
    assert row["rollout_tokens"] > 0 and row["accept_len"] >= 1.0 and row["time_update"] > 0
    assert (wd / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_generate_answers_prompts(tmp_path, capsys):
    out = tmp_path / "answers.json"
    rc = generate_main(["--config", "configs/smollm2_135m.py", "--config.rollout.max_new_tokens=12",
                        "--prompt", "What is 2 + 2?", "--prompt", "Say hello.", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert ">>> What is 2 + 2?" in text and "tokens/s" in text
    data = json.loads(out.read_text())
    assert len(data["answers"]) == 2 and all(1 <= n <= 12 for n in data["lengths"])
    assert data["tokens_per_s"] > 0


def test_inspect_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert inspect_main(["--config", "configs/llama3_3_70b.py", "--config.mesh.tensor=2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_params"] == 70_553_706_496
    assert "GiB" in capsys.readouterr().out


def test_inspect_cli_mesh_does_not_fit(capsys):
    assert inspect_main(["--config", "configs/tiny.py", "--config.mesh.data=3"]) == 2
    assert "do not divide" in capsys.readouterr().err
