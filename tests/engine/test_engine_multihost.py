"""Two processes (jax.distributed, gloo on 127.0.0.1), one rollout replica each: a short rollout with spot
training takes identical decisions on both processes, returns the same answers as a single-process plain
rollout, and ends with the same averaged drafter everywhere."""

import hashlib

import numpy as np
import pytest

from tests.multiproc import run_processes

MAX_NEW = [2, 3, 40, 5, 4, 6, 3, 2]  # the long answer is on replica 0 (process 0); replica 1 finishes early


def _setup():
    from flax import nnx

    from tests.helpers import tiny_model, train_drafter

    cfg, model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 200, size=int(rng.integers(3, 12))))) for _ in range(8)]
    drafter, _ = train_drafter(model, prompts[:4], steps=10)
    return model, drafter, prompts, nnx


def _target_spot_rollout(args):
    import jax

    from tlt_jax.drafter.buffer import DrafterBuffer
    from tlt_jax.drafter.loss import target_features
    from tlt_jax.core.optim import make_optimizer
    from tlt_jax.drafter.spot import SpotTrainer
    from tlt_jax.drafter.train import split_drafter
    from tlt_jax.engine import AdaptiveEngine, EngineConfig
    from tlt_jax.rollout import DrafterInput, RolloutSpec, generate

    model, drafter, prompts, nnx = _setup()
    spec = RolloutSpec(max_new_tokens=40, chunk_steps=4)
    local = jax.local_devices()
    ref = generate(model, prompts, spec, max_new=MAX_NEW, seed=0)  # this process alone, plain
    # the buffer: features of the reference answers, tagged as the previous RL step
    p = max(len(x) for x in prompts)
    lay = np.zeros((8, p + 40), np.int32)
    ok = np.zeros((8, p + 40), bool)
    for i, (pr, an) in enumerate(zip(prompts, ref.tokens)):
        lay[i, p - len(pr):p], ok[i, p - len(pr):p] = pr, True
        lay[i, p:p + len(an)], ok[i, p:p + len(an)] = an, True
    buf = DrafterBuffer(capacity=64, window=64)
    buf.add(0, lay, np.asarray(jax.device_put(target_features(model, lay, ok), local[0])), ok, answer_start=p)
    dg, dparams, frozen = split_drafter(drafter)
    spot = SpotTrainer(dg, dparams, frozen, nnx.split(model)[0], buf, make_optimizer(1e-3), rows=2, seq_len=32)
    spot.rl_step = 1
    config = EngineConfig(replicas=2, sd_threshold=2, arms=("chain-2",), ngram_arms=("ngram:chain-2",))
    eng = AdaptiveEngine(nnx.split(model)[0], spec, config, batch_size=8, cache_len=64,
                         drafter_graphdef=nnx.split(drafter)[0])
    out = eng.generate(nnx.split(model)[1], prompts, seed=0, max_new=MAX_NEW,
                       drafter=DrafterInput(nnx.split(drafter)[1], trainer=spot))
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(spot.params))).hexdigest()
    return {"decisions": [list(d) for d in out.decisions], "tokens": out.tokens, "ref": ref.tokens,
            "local_replicas": [r.index for r in eng.replicas if r.local], "spot_steps": out.stats["spot_steps"],
            "trained": out.stats["drafter_replicas_trained"], "drafter": digest, "devices": jax.device_count()}


@pytest.mark.multihost
def test_two_processes_take_identical_decisions():
    a, b = run_processes(f"{__name__}:_target_spot_rollout", 2, {}, local_devices=2, timeout_s=400)
    assert a["devices"] == b["devices"] == 4
    assert a["local_replicas"] == [0] and b["local_replicas"] == [1]  # one replica per process
    assert a["decisions"] == b["decisions"]
    assert a["tokens"] == b["tokens"] == a["ref"]  # gathered answers equal the plain single-process rollout
    trained = {d[1] for d in a["decisions"] if d[2] == "drafter"}
    assert trained == {1}  # only the replica whose rows were all done trained the drafter
    assert a["spot_steps"] == b["spot_steps"] > 0 and a["trained"] == b["trained"] == 1
    assert a["drafter"] == b["drafter"]  # the averaged drafter is the same on both processes
