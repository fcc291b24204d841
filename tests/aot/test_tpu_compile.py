"""Real TPU compiles on this CPU host: the compile-only devices of a TPU topology (the ``tpu`` extra, libtpu) run
XLA:TPU and Mosaic without a chip. Each program's compiled memory must fit the chip's HBM."""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.attention import cached_attention
from tests.helpers import run_command, strict_json
from tlt_jax.app import aot
from tlt_jax.app.config import load_config
from tlt_jax.bench import aot as aot_bench
from tlt_jax.parallel import chips

pytestmark = [pytest.mark.tpu_aot,
              pytest.mark.skipif(not chips.tpu_compiler_available(), reason="libtpu is not installed "
                                 "(pip install -e '.[tpu]')")]
TARGETS = ["tpu-v5e", "tpu-v5p"]


def _fits(rep, target):
    peak = aot.peak_bytes(rep)
    hbm = chips.chip(target).hbm_bytes
    print(f"{target} {rep['program']} {rep.get('strategy', '')}: {peak / 2 ** 20:.1f} MiB of {hbm / 1e9:.0f} GB, "
          f"{rep.get('flops', 0):.3g} FLOPs, compiled in {rep.get('compile_s')} s")
    assert 0 < peak < hbm, rep


KERNEL_SHAPES = [  # (rows, queries, heads, KV heads, head dim, cache, attend_len, dtype)
    (2, 8, 28, 4, 128, 1024, 1001, jnp.bfloat16),   # attend_len not a multiple of 8
    (2, 8, 28, 4, 128, 4100, None, jnp.bfloat16),   # no multiple of 8 divides the cache
    (1, 64, 28, 4, 128, 8192, None, jnp.bfloat16),  # a wide tree: 448 query rows
    (8, 1, 28, 4, 128, 8192, None, jnp.bfloat16),   # decode: the cache alone
    (2, 5, 9, 3, 64, 640, None, jnp.float32),       # SmolLM2's heads in float32
]


@pytest.mark.parametrize("target", TARGETS)
def test_attention_kernel_compiles_at_edge_shapes(target):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = chips.compile_only_devices(target)[0]
    whole = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    for b, t, nh, kvh, d, s, attend, dtype in KERNEL_SHAPES:
        sd = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=whole)  # noqa: E731
        args = [sd((b, t, nh, d)), sd((b, kvh, s, d)), sd((b, kvh, s, d)), sd((b,), jnp.int32)]
        args += [None] * 3 if t == 1 else [sd((b, t, kvh, d)), sd((b, t, kvh, d)), sd((b, t, t), jnp.bool_)]
        fn = jax.jit(lambda *a: cached_attention(*a, attend_len=attend, impl="auto"))
        compiled = fn.lower(*args).compile()
        assert "tpu_custom_call" in compiled.as_text(), (b, t, s)
        m = compiled.memory_analysis()
        assert m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes < chips.chip(target).hbm_bytes


def _tiny_with_embedded_arms():
    """The tiny model with the embedded config's engine arms, on 2 replicas of 2 chips each."""
    embedded = load_config("smollm2_135m")
    config = load_config("tiny", ["tlt.replicas=2", "mesh.fsdp=2", "mesh.tensor=2"])
    config.tlt.arms, config.tlt.ngram_arms = tuple(embedded.tlt.arms), tuple(embedded.tlt.ngram_arms)
    return config


@pytest.mark.parametrize("target", TARGETS)
def test_rollout_programs_compile(target):
    """Prefill and plain decode chunk of the baseline's rollout and the engine's chunk for every arm of the
    embedded config, on one replica of two chips (rows split over them: the kernel runs per shard)."""
    config = _tiny_with_embedded_arms()
    devices = chips.compile_only_devices(target)[:4]
    reports = [aot.compile_rollout_start(config, devices, bucket=4, prompt_len=32, cache_len=128),
               aot.compile_decode_chunk(config, devices, bucket=4, cache_len=128)]
    arms = aot.engine_arms(config)
    assert arms == ["plain", "chain-2@sampled", "4_2_8@sampled", "group:chain-2"]
    for arm in arms:
        reports.append(aot.compile_speculative_chunk(config, devices, bucket=4, cache_len=128, strategy=arm))
    for rep in reports:
        assert rep["replica_devices"] == 2
        # every cached attention is the Mosaic kernel (one per layer and forward); the fresh prefill has no cache
        assert (rep["kernel_calls"] > 0) == (rep["program"] != "prefill"), rep
        _fits(rep, target)


@pytest.mark.parametrize("target", TARGETS)
def test_sharded_training_programs_compile(target):
    """The log-prob forward and the GRPO update of the tiny model over 4 chips (FSDP 2 x tensor 2)."""
    config = _tiny_with_embedded_arms()
    devices = chips.compile_only_devices(target)[:4]
    for rep in (aot.compile_logprob(config, devices, rows=8, prompt_len=32, answer_len=64),
                aot.compile_train_step(config, devices, rows=8, prompt_len=32, answer_len=64)):
        assert rep["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
        assert rep["flops"] > 0
        _fits(rep, target)


def test_unknown_target_and_gpu_targets_are_clear_errors():
    with pytest.raises(ValueError, match="unknown target 'tpu-v9'.*known"):
        chips.compile_only_devices("tpu-v9")
    with pytest.raises(ValueError, match="no compile-only devices"):
        chips.compile_only_devices("h100")


def test_aot_command_compiles_for_a_tpu_target(tmp_path):
    out = tmp_path / "aot.json"
    p = run_command("tlt_jax.cli.aot", ["--config", "configs/tiny.py", "--target", "tpu-v5e", "--devices", "4",
                                        "--rows", "8", "--prompt-len", "32", "--answer-len", "64", "--bucket", "4",
                                        "--strategy", "chain-2", "--json", str(out)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = strict_json(out.read_text())
    assert res["platform"] == "tpu" and [r["program"] for r in res["reports"]] == ["train_step", "speculative_chunk"]
    p = run_command("tlt_jax.cli.aot", ["--config", "configs/tiny.py", "--target", "tpu-v9"])
    assert p.returncode == 2 and "unknown target 'tpu-v9'" in p.stdout


def test_projection_bench_writes_a_model_and_names_what_does_not_fit(tmp_path, capsys):
    """bench.aot on the tiny model: the roofline table and the cost curve, labelled a model; a cache
    at batch 32 (8M slots: 30 GiB of KV cache per chip) does not fit a v5e: named with its bytes, exit status 1."""
    out = tmp_path / "aot.json"
    argv = ["--target", "tpu-v5e", "--config", "configs/tiny.py", "--batches", "1,2", "--verify", "4",
            "--programs", "decode,verify,chunk", "--json", str(out)]
    p = run_command("tlt_jax.bench.aot", argv)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "roofline MODEL" in p.stdout and "verify-V cost in decode steps" in p.stdout
    res = strict_json(out.read_text())
    assert res["model_not_measurement"] is True and res["chip"]["hbm_bytes"] == 16e9
    assert [r["name"] for r in res["reports"]] == ["decode_step b=1", "verify V=4 b=1", "decode_step b=2",
                                                   "verify V=4 b=2", "decode_chunk b=2"]
    for r in res["reports"]:
        assert r["fits"] and r["roofline_model_s"] > 0 and r["kernel_calls"] > 0, r
    assert all(row["V=4"] > 0 for row in res["verify_cost_in_decode_steps"])

    p = run_command("tlt_jax.bench.aot", ["--target", "tpu-v5e", "--config", "configs/tiny.py", "--batches", "32",
                                          "--programs", "decode", "--answer-len", "8000000"])
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "error: decode_step b=32 does not fit a TPU v5e" in p.stderr
    for argv, msg in ((["--target", "tpu-v9"], "unknown --target"), (["--target", "h100", "--programs", "x"],
                                                                     "--programs takes"),
                      (["--target", "h100", "--layers", "1"], "--layers must be")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, before anything compiles
            aot_bench.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv


def test_projection_extrapolated_from_fewer_layers_matches_the_full_depth(tmp_path):
    """--layers N: the per-layer part scaled linearly from N and N / 2 layers gives the full model's counts."""
    res = {}
    for layers in ("0", "2"):
        out = tmp_path / f"aot{layers}.json"
        p = run_command("tlt_jax.bench.aot", ["--target", "tpu-v5e", "--config", "configs/tiny.py", "--batches", "4",
                                              "--programs", "decode", "--layers", layers, "--json", str(out),
                                              "--config.model.arch.num_layers=6"])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        res[layers] = strict_json(out.read_text())["reports"][0]
    assert res["2"]["extrapolated_from_layers"] == [1, 2] and "extrapolated_from_layers" not in res["0"]
    for key in ("flops", "bytes_accessed", "argument_gib_per_device"):
        assert abs(res["2"][key] - res["0"][key]) <= 0.05 * res["0"][key], (key, res["2"][key], res["0"][key])
