import glob
import os

import numpy as np
import pytest

from tlt_jax.app.config import CONFIG_DIR, load_config, split_config_args
from tlt_jax.app.specs import model_config
from tlt_jax.core.errors import ConfigError

ALL = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if "__" not in p)


def test_all_configs_present():
    assert {"tiny", "smollm2_135m", "qwen2_5_7b", "r1_distill_qwen_7b", "qwen2_5_32b", "llama3_3_70b", "qwen3_0_6b",
            "qwen3_1_7b", "qwen3_4b", "qwen3_8b"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_config_loads_and_describes_a_model(name):
    c = load_config(name)
    cfg = model_config(c)
    assert cfg.num_params() > 0


def test_overrides_are_typed():
    c = load_config("configs/tiny.py", ["rollout.top_p=0.9", "rollout.max_new_tokens=7", "mesh.tensor=2",
                                        "model.dtype=bfloat16", "rollout.stop_strings=('<a>','<b>')"])
    assert c.rollout.top_p == 0.9 and c.rollout.max_new_tokens == 7 and c.mesh.tensor == 2
    assert c.model.dtype == "bfloat16" and tuple(c.rollout.stop_strings) == ("<a>", "<b>")


def test_split_config_args():
    path, ov, rest = split_config_args(["--config", "x.py", "--config.a.b=1", "--config.c", "2", "--json", "o"])
    assert path == "x.py" and ov == ["a.b=1", "c=2"] and rest == ["--json", "o"]


@pytest.mark.parametrize("override,message", [
    ("rollout.top_pp=0.9", "unknown config key 'rollout.top_pp'; did you mean"),
    ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\]"),
    ("rollout.top_p=1.01", r"rollout.top_p must be in \(0, 1\]"),
    ("rollout.max_new_tokens=many", "cannot parse 'many'"),
    ("mesh.data=0", "mesh.data must be a positive size"),
    ("mesh.train_devices=-1", "mesh.train_devices must be >= 0"),
    ("model.dtype=float8", "model.dtype must be"),
    ("model.arch.num_kv_heads=3", "multiple of num_kv_heads"),
    ("tlt.warmup_steps=0", "tlt.warmup_steps must be >= 1"),
    ("tlt.warmup_budget_s=0", "tlt.warmup_budget_s must be > 0"),
    ("eval.samples=0", "eval.samples must be >= 1"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_unknown_config_file():
    with pytest.raises(ConfigError, match="known configs"):
        load_config("no_such_config")


@pytest.mark.parametrize("name,total,non_embedding", [
    ("qwen3_0_6b", 0.60e9, 0.44e9), ("qwen3_1_7b", 1.7e9, 1.4e9), ("qwen3_4b", 4.0e9, 3.6e9),
    ("qwen3_8b", 8.2e9, 6.95e9)])
def test_qwen3_configs_have_the_published_sizes(name, total, non_embedding):
    """Weight-free (tlt-inspect's abstract model): the parameter counts the model cards state, q/k norms included."""
    import jax
    from jax.sharding import Mesh

    from tlt_jax.app.inspect import inspect_config
    from tlt_jax.app.specs import model_config

    config = load_config(name)
    cfg = model_config(config)
    assert cfg.architecture == "qwen3" and cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 128
    report = inspect_config(config, Mesh(np.asarray(jax.devices()[:1]), ("fsdp",)))
    n = report["num_params"]
    assert n == cfg.num_params()
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    assert abs(n - total) < 0.02 * total and abs(n - embed - non_embedding) < 0.02 * non_embedding, n


RECIPE_RECORDS = {  # one record of each recipe's data and eval files, in the layout the recipe expects on disk
    "recipe_gsm8k": ({"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
                     {"question": "What is 1,200 + 34?", "answer": "1,234\n#### 1,234"}, "7", "1234"),
    "recipe_math": ({"problem": "Find $x$ if $2x = 6$.", "solution": "Divide: $x = \\boxed{3}$."},
                    {"problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?", "answer": "1"}, "3", "1"),
}


@pytest.mark.parametrize("name", sorted(RECIPE_RECORDS))
def test_recipes_read_their_data_and_eval_files(name, tmp_path):
    """Each recipe evaluates on held-out data, splits its rollout batch over its replicas, and reads local files
    in its documented layout (the hub sources need the network, so the files stand in for them)."""
    import json

    from tlt_jax.app import specs
    from tlt_jax.data.loader import load_examples

    config = load_config(name)
    assert config.model.arch.architecture == "qwen3" and int(config.eval.every) > 0
    assert specs.rows_per_step(config) % int(config.tlt.replicas) == 0
    src, held = specs.data_source(config), specs.eval_source(config)
    assert (src["source"], src["split"]) != (held["source"], held["split"])
    train_rec, eval_rec, train_gold, eval_gold = RECIPE_RECORDS[name]
    files = {}
    for what, rec in (("train", train_rec), ("test", eval_rec)):
        files[what] = tmp_path / f"{what}.jsonl"
        files[what].write_text(json.dumps(rec) + "\n")
    config = load_config(name, [f"data.source={files['train']}", f"eval.source={files['test']}"])
    for source, gold in ((specs.data_source(config), train_gold), (specs.eval_source(config), eval_gold)):
        kw = {k: v for k, v in source.items() if k not in ("source", "instruction")}
        assert [e.answer for e in load_examples(source["source"], **kw)] == [gold]
