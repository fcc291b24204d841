"""Paper-scale programs compile ahead of time from abstract arrays on 8 fake CPU devices (no weights needed)."""

import jax
import pytest

from tlt_jax.app.config import load_config
from tlt_jax.app import aot

GIB = 2.0 ** 30
pytestmark = [pytest.mark.slow, pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")]


def test_qwen2_5_7b_train_step_and_speculative_chunk_compile_on_8_devices():
    # The full model's parameter count, from abstract arrays only.
    full = aot.abstract_policy(load_config("qwen2_5_7b"))[2]
    n_full = 7_615_616_512
    assert sum(x.size for x in jax.tree.leaves(full)) == n_full
    # Compiled: 4 of the 28 layers at full width (same layouts and per-layer programs; the layer loop is unrolled,
    # so compile time grows with depth: 28 layers took 70 s + 17 s here).
    config = load_config("qwen2_5_7b", ["mesh.fsdp=4", "mesh.tensor=2", "model.arch.num_layers=4"])
    devices = jax.devices()[:8]
    train = aot.compile_train_step(config, devices, rows=8, prompt_len=128, answer_len=256)
    n = train["num_params"]
    embed = 152064 * 3584
    layer = (n_full - 2 * embed - 3584) // 28
    assert n == 2 * embed + 3584 + 4 * layer and train["param_dtype"] == "bfloat16" and train["remat"]
    # policy + Adam's two moments (bfloat16 like the parameters), split 8 ways by FSDP x tensor parallelism
    want = 3 * 2 * n / 8 / GIB
    assert want * 0.99 < train["state_gib_per_device_max"] < want * 1.02, train
    assert abs(train["argument_gib_per_device"] - train["state_gib_per_device_max"]) < 0.05, train
    assert train["alias_gib_per_device"] > 0.9 * train["state_gib_per_device_max"]  # donated: updated in place
    assert 0 < train["temp_gib_per_device"] < 80, train

    chunk = aot.compile_speculative_chunk(config, devices, bucket=8, cache_len=384, strategy="4_2_8")
    # one of tlt.replicas=2 replicas: 4 devices, the policy whole on each (plus the one-layer drafter)
    assert chunk["replica_devices"] == 4
    policy = 2 * n / GIB
    assert policy < chunk["argument_gib_per_device"] < policy * 1.15, chunk
    print(train, chunk, sep="\n")
