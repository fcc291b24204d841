"""Held-out evaluation on the tiny model (real tokenizer): during training and of a checkpoint (tlt-eval), the
files and rows it writes, and its bad inputs."""

import json
import os

import pytest

from tests.helpers import strict_json as strict
from tlt_jax.app import build, specs
from tlt_jax.app.config import load_config
from tlt_jax.app.evaluator import evaluate_checkpoint
from tlt_jax.app.trainer import Trainer
from tlt_jax.core.errors import CheckpointError, ConfigError, DataError
from tlt_jax.io.tokenizer import load_tokenizer

TINY_EVAL = ["model.arch.vocab_size=49152", "model.tokenizer=embedded:smollm2", "rollout.max_prompt_len=128",
             "rollout.max_new_tokens=16", "rl.prompts_per_step=2", "rl.group_size=4", "rl.lr=1e-3",
             "rl.reward=tests.rl.reward_fns:parity_correct", "tlt.enable=False", "eval.limit=3", "eval.samples=3",
             "train.plots=False"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step baseline run that evaluates the initial policy and step 2."""
    wd = str(tmp_path_factory.mktemp("eval") / "run")
    config = load_config("tiny", TINY_EVAL + ["rl.steps=2", "eval.every=2", "eval.at_start=True"])
    trainer = Trainer(config, wd, log=lambda m: None)
    history = trainer.run(progress=False)
    return config, trainer, history


def test_training_evaluates_at_the_chosen_steps_and_logs_rows_files_and_tensorboard(run):
    config, trainer, history = run
    assert [h["step"] for h in history] == [1, 2]  # the training history leaves the eval rows out
    rows = [strict(x) for x in open(trainer.metrics_path)]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals == trainer.read_evals()
    s = evals[-1]["eval"]
    assert s["problems"] == 3 and s["samples"] == 3
    for key in ("greedy_accuracy", "mean@3", "pass@1", "pass@3", "format_rate", "len_p50", "len_p90"):
        assert 0 <= s[key] <= (1 if not key.startswith("len") else 16), key
    records = [strict(x) for x in open(os.path.join(trainer.workdir, "eval", "2.jsonl"))]
    assert len(records) == 3 and all(len(r["samples"]) == 3 and "greedy" in r for r in records)
    # the summary is the mean over problems of each record's own numbers
    assert s["mean@3"] == pytest.approx(sum(r["correct"] for r in records) / 9)
    assert s["pass@3"] == pytest.approx(sum(r["pass"]["3"] for r in records) / 3)
    assert s["greedy_accuracy"] == pytest.approx(sum(r["greedy"]["correct"] for r in records) / 3)
    assert os.path.exists(os.path.join(trainer.workdir, "plots", "eval.png"))
    assert any(n.startswith("events") for n in os.listdir(os.path.join(trainer.workdir, "tb")))


def test_eval_of_a_checkpoint_equals_the_eval_during_training(run, tmp_path):
    """What tlt-eval runs (tests/cli runs the command itself) on the step-2 checkpoint, from a fresh config."""
    config, trainer, _ = run
    out = str(tmp_path / "out")
    step, result, path = evaluate_checkpoint(load_config("tiny", TINY_EVAL), progress=False, log=lambda m: None,
                                             checkpoint=os.path.join(trainer.workdir, "checkpoints"), workdir=out)
    assert step == 2 and path == os.path.join(out, "eval", "2.jsonl")
    assert open(path).read() == open(os.path.join(trainer.workdir, "eval", "2.jsonl")).read()
    a = json.load(open(os.path.join(out, "eval", "2.summary.json")))
    b = json.load(open(os.path.join(trainer.workdir, "eval", "2.summary.json")))
    assert a.pop("time_s") > 0 and b.pop("time_s") > 0
    assert a == b == {"step": 2, **{k: v for k, v in trainer.read_evals()[-1]["eval"].items() if k != "time_s"}}
    assert result.summary["pass@3"] == a["pass@3"]


def test_a_checkpoint_of_another_model_is_a_clear_error(run):
    _, trainer, _ = run
    other = load_config("tiny", TINY_EVAL + ["model.arch.hidden_size=32"])
    with pytest.raises(CheckpointError, match=r"checkpoint of another model: policy array .*embedding.* is "
                                              r"float32\[49152, 64\] there and float32\[49152, 32\]"):
        evaluate_checkpoint(other, checkpoint=trainer.workdir, progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"has no step 7; it has \[2\]"):
        evaluate_checkpoint(other, checkpoint=trainer.workdir, step=7, progress=False, log=lambda m: None)


def test_a_failing_evaluation_warns_and_training_goes_on(tmp_path):
    config = load_config("tiny", TINY_EVAL + ["rl.steps=1", "eval.every=1", "eval.greedy=False"])
    trainer = Trainer(config, str(tmp_path / "w"), log=lambda m: None)

    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    trainer.evaluator.sampled.generate = lost  # fault injection: the evaluation's rollout fails
    with pytest.warns(RuntimeWarning, match="evaluation at step 1 failed .*device lost.*training continues"):
        history = trainer.run(progress=False)
    assert [h["step"] for h in history] == [1] and trainer.read_evals() == []
    assert os.path.isdir(os.path.join(trainer.workdir, "checkpoints", "1"))  # the step's checkpoint was written


def test_eval_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.k: pass@k needs 1 <= k <= eval.samples \(4\); \[8\]"):
        load_config("tiny", ["eval.samples=4", "eval.k=(1, 8)"])
    with pytest.raises(ConfigError, match="eval.seed .* equals data.seed"):
        specs.eval_source(load_config("tiny", ["eval.seed=0"]))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="give the held-out file as eval.source"):
        specs.eval_source(load_config("tiny", [f"data.source={train}"]))
    assert specs.eval_settings(load_config("tiny", ["eval.samples=8"])).ks == (1, 8)


def test_an_eval_file_without_the_named_fields_names_them(tmp_path):
    held = tmp_path / "test.jsonl"
    held.write_text(json.dumps({"problem": "1 + 1?", "solution": "\\boxed{2}"}) + "\n")
    config = load_config("tiny", TINY_EVAL + [f"eval.source={held}"])
    tok = load_tokenizer("embedded:smollm2")
    with pytest.raises(DataError, match=r"eval: dataset .*test.jsonl' has no field 'question'; its columns are "
                                        r"\['problem', 'solution'\]"):
        build.task_prompts(config, tok, specs.eval_source(config), what="eval")
    config = load_config("tiny", TINY_EVAL + [f"eval.source={held}", "eval.question_field=problem",
                                              "eval.answer_field=solution", "eval.answer_format=boxed"])
    ids, questions, golds = build.task_prompts(config, tok, specs.eval_source(config), what="eval")
    assert golds == ["2"] and questions[0].startswith("1 + 1?") and len(ids) == 1
