"""The drafter exported in the EAGLE-1 layout: names, shapes and dtypes of the format, and a round trip back
through our own loader that gives the same draft logits."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import run_command
from tlt_jax.core.errors import CheckpointError
from tlt_jax.io.eagle import export_eagle, load_eagle
from tlt_jax.io.weights import SafetensorsFile
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, tie_embeddings=False)
LAYER = ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
         "layers.0.self_attn.o_proj.weight", "layers.0.post_attention_layernorm.weight",
         "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"]


def _draft(drafter, target):
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 5)), jnp.int32)
    feats = jnp.asarray(rng.standard_normal((2, 5, CFG.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32)[None], (2, 5))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
    hidden, _, _ = drafter(target, toks, feats, pos, mask)
    return np.asarray(drafter.logits(hidden, drafter.head_weight(target)))


@pytest.mark.parametrize("vocab", [None, np.asarray([3, 7, 11, 40, 95], np.int32)], ids=["full", "draft_vocab"])
def test_export_layout_and_round_trip(tmp_path, vocab):
    target = Decoder(CFG, nnx.Rngs(0))
    drafter = Drafter(CFG, nnx.Rngs(1), draft_vocab=vocab)
    files = export_eagle(str(tmp_path), drafter, target)
    n = CFG.vocab_size if vocab is None else len(vocab)
    assert sorted(os.path.basename(f) for f in files) == sorted(
        ["config.json", "model.safetensors"] + ([] if vocab is None else ["token_map.json"]))
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLMEagle"] and conf["num_hidden_layers"] == 1
    assert conf["bias"] is True and conf["tie_word_embeddings"] is False and conf["hot_vocab_size"] == n
    assert conf["eagle"]["target_num_hidden_layers"] == 3
    st = SafetensorsFile(str(tmp_path / "model.safetensors"))
    h = CFG.hidden_size
    shapes = {k: tuple(v["shape"]) for k, v in st.header.items()}
    assert set(shapes) == {"fc.weight", "fc.bias", "embed_tokens.weight", "lm_head.weight"} | set(LAYER)
    assert {v["dtype"] for v in st.header.values()} == {"F32"}
    assert shapes["fc.weight"] == (h, 2 * h) and shapes["fc.bias"] == (h,)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (CFG.num_heads * CFG.head_dim, h)  # [out, in]
    assert shapes["layers.0.self_attn.k_proj.weight"] == (CFG.num_kv_heads * CFG.head_dim, h)
    assert shapes["layers.0.mlp.down_proj.weight"] == (h, CFG.intermediate_size)
    assert shapes["embed_tokens.weight"] == (CFG.vocab_size, h) and shapes["lm_head.weight"] == (n, h)
    if vocab is not None:
        assert json.loads((tmp_path / "token_map.json").read_text()) == vocab.tolist()
        np.testing.assert_array_equal(st.get("lm_head.weight"), np.asarray(target.lm_head.kernel[...]).T[vocab])

    back = load_eagle(str(tmp_path), target)
    np.testing.assert_array_equal(_draft(back, target), _draft(drafter, target))


def test_qwen3_export_names_the_head_norms(tmp_path):
    cfg = ModelConfig(architecture="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
    target = Decoder(cfg, nnx.Rngs(0))
    export_eagle(str(tmp_path), Drafter(cfg, nnx.Rngs(1)), target)
    st = SafetensorsFile(str(tmp_path / "model.safetensors"))
    assert tuple(st.header["layers.0.self_attn.q_norm.weight"]["shape"]) == (16,)
    assert "layers.0.self_attn.k_norm.weight" in st.header
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLMEagle"]
    load_eagle(str(tmp_path), target)


def test_an_export_for_another_target_is_refused(tmp_path):
    target = Decoder(CFG, nnx.Rngs(0))
    export_eagle(str(tmp_path), Drafter(CFG, nnx.Rngs(1)), target)
    with pytest.raises(CheckpointError, match="another target.*hidden_size"):
        load_eagle(str(tmp_path), Decoder(CFG.replace(hidden_size=48), nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match="another target of the same shape"):
        load_eagle(str(tmp_path), Decoder(CFG, nnx.Rngs(5)))
    with pytest.raises(CheckpointError, match="not an EAGLE drafter export"):
        load_eagle(str(tmp_path / "nothing"), target)


def test_export_command(tmp_path):
    from tlt_jax.app.build import model_from_config
    from tlt_jax.app.config import load_config
    from tlt_jax.io.drafter import save_drafter

    _, model = model_from_config(load_config("tiny"), None)
    save_drafter(str(tmp_path / "d"), Drafter(model.cfg, nnx.Rngs(0)), model)
    out = tmp_path / "eagle"
    p = run_command("tlt_jax.cli.export_drafter", ["--config", "configs/tiny.py", "--drafter", str(tmp_path / "d"),
                                                   "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model.safetensors" in p.stdout and (out / "config.json").exists()
    p = run_command("tlt_jax.cli.export_drafter", ["--config", "configs/tiny.py", "--drafter", str(tmp_path / "no"),
                                                   "--out", str(out)])
    assert p.returncode == 2 and "error:" in p.stderr, p.stderr[-1000:]
