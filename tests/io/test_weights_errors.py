"""Bad checkpoints give clear errors."""

import json
import os

import numpy as np
import pytest

from tests.models.hf_tiny import make_tiny_checkpoint
from tlt_jax.core.errors import CheckpointError, UnsupportedModelError
from tlt_jax.io.weights import load_checkpoint, undo_rotary_permutation


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ok")
    make_tiny_checkpoint(str(path), "llama", tie=False)
    return path


def copy_dir(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(str(d))


def test_garbage_safetensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(str(d))


def test_missing_tensor(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "missing")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file has 2 layers
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.2.* is missing"):
        load_checkpoint(str(d))


def test_unsupported_architecture(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(str(d))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + os.urandom(2000))
    with pytest.raises(CheckpointError, match="corrupt GGUF"):
        load_checkpoint(str(f))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        load_checkpoint(str(f))


def test_rotary_permutation_inverse():
    """llama.cpp permutes rows (head, half, pair) -> (head, pair, half); undoing it restores the rows."""
    n_head, d, cols = 3, 8, 5
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    permuted = w.reshape(n_head, 2, d // 2, cols).swapaxes(1, 2).reshape(n_head * d, cols)
    np.testing.assert_array_equal(undo_rotary_permutation(permuted, n_head), w)
    assert not np.array_equal(permuted, w)


def test_qwen3_checkpoint_without_qk_norms(tmp_path):
    """A Qwen3 checkpoint whose per-head q/k norms are missing (e.g. a Qwen2 file relabelled) is refused, naming
    the tensor."""
    import safetensors.numpy

    d = tmp_path / "qwen3"
    make_tiny_checkpoint(str(d), "qwen3", tie=True)
    tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if "q_norm" not in k and "k_norm" not in k},
                                str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.(q|k)_norm\.weight .* is missing"):
        load_checkpoint(str(d))
