"""The adaptive engine: compaction and arm switching leave greedy outputs identical; replicas are sub-meshes;
finished replicas, and only they, run drafter steps; the spot-trained drafters are averaged."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_model, train_drafter
from tlt_jax.drafter.buffer import DrafterBuffer
from tlt_jax.drafter.loss import target_features
from tlt_jax.core.optim import make_optimizer
from tlt_jax.core.shapes import next_pow2
from tlt_jax.drafter.spot import SpotTrainer
from tlt_jax.drafter.train import split_drafter
from tlt_jax.engine import AdaptiveEngine, EngineConfig
from tlt_jax.parallel import make_replicas
from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.rollout import DrafterInput, RolloutSpec, generate
from tlt_jax.rollout.sampling import SamplingParams

SPEC = RolloutSpec(max_new_tokens=40, chunk_steps=4)


@pytest.fixture(scope="module")
def setup():
    cfg, model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 200, size=int(rng.integers(3, 12))))) for _ in range(8)]
    # very different answer lengths: the long tail that compaction and spot training feed on
    max_new = [2, 3, 40, 5, 4, 6, 3, 2]
    ref = generate(model, prompts, SPEC, max_new=max_new, seed=0)
    drafter, _ = train_drafter(model, prompts[:4], steps=30)
    return model, drafter, prompts, max_new, ref


def _engine(model, drafter, replicas, devices, **kw):
    g = nnx.split(model)[0]
    dg = nnx.split(drafter)[0] if drafter is not None else None
    kw.setdefault("arms", ("chain-2", "3_2_5"))
    config = EngineConfig(replicas=replicas, sd_threshold=2, ngram_arms=("ngram:chain-2",), **kw)
    return AdaptiveEngine(g, SPEC, config, batch_size=8, cache_len=64, drafter_graphdef=dg, devices=devices)


def test_buckets_and_replicas():
    assert [next_pow2(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    reps = make_replicas(4, jax.devices()[:8])
    assert [len(r.devices) for r in reps] == [2, 2, 2, 2]
    assert len({d for r in reps for d in r.devices}) == 8  # disjoint sub-meshes
    assert [r.devices for r in make_replicas(3, jax.devices()[:1])] == [(jax.devices()[0],)] * 3
    with pytest.raises(ConfigError, match="evenly"):
        make_replicas(3, jax.devices()[:8])
    tp = make_replicas(2, jax.devices()[:8], tensor=2)  # tensor parallelism inside each replica
    assert [dict(r.mesh.shape) for r in tp] == [{"data": 2, "tensor": 2}] * 2 and tp[1].data_size == 2
    with pytest.raises(ConfigError, match="replica_tensor=3 does not divide"):
        make_replicas(2, jax.devices()[:8], tensor=3)


@pytest.mark.parametrize("replicas,ndev,tensor", [(1, 1, 1), (2, 8, 2)])
def test_compaction_and_arms_keep_greedy_outputs(setup, replicas, ndev, tensor):
    model, drafter, prompts, max_new, ref = setup
    eng = _engine(model, drafter, replicas, jax.devices()[:ndev], replica_tensor=tensor)
    params, dstate = nnx.split(model)[1], nnx.split(drafter)[1]
    for use_drafter in (True, False):
        out = eng.generate(params, prompts, seed=0, drafter=DrafterInput(dstate, proposes=use_drafter),
                           max_new=max_new)
        assert out.tokens == ref.tokens
        assert list(out.finish_reasons) == list(ref.finish_reasons)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        buckets = {d[3] for d in out.decisions if d[2] == "rollout"}
        assert min(buckets) < eng.top_bucket  # rows were compacted into smaller buckets
        arms = {d[4] for d in out.decisions if d[2] == "rollout" and d[3] <= 2}
        assert len(arms) >= 2  # speculation arms were tried below the threshold
        # where speculation ran and what it gained (the per-step metrics): tokens/s per bucket:arm, time share
        rates = out.stats["arm_tok_s"]
        assert set(rates) == set(out.stats["arm_chunks"]) and all(v >= 0 for v in rates.values())
        assert 0 < out.stats["spec_time_share"] < 1  # plain decoding above the threshold, speculation below
    assert out.stats["pool_programs"] <= eng.pool.max_programs
    if replicas > 1:  # a program the other replica already had was relocated, not compiled
        assert out.stats["pool_relocations"] > 0


def test_sampled_answers_do_not_depend_on_the_layout(setup):
    """At T = 0.8 the engine (2 replicas, compaction, target-only arms and plain decoding) samples, for the same
    seed, the answers plain decoding of the whole batch samples: each row's token at answer position t is drawn
    from u(row, t), whichever replica, bucket or arm it runs in."""
    model, drafter, prompts, max_new, _ = setup
    hot = RolloutSpec(max_new_tokens=40, chunk_steps=4, sampling=SamplingParams(temperature=0.8))
    ref = generate(model, prompts, hot, max_new=max_new, seed=5)
    g, params = nnx.split(model)
    config = EngineConfig(replicas=2, sd_threshold=2, arms=("chain-2",), ngram_arms=("ngram:chain-2",))
    eng = AdaptiveEngine(g, hot, config, batch_size=8, cache_len=64, drafter_graphdef=nnx.split(drafter)[0],
                         devices=jax.devices()[:2])
    out = eng.generate(params, prompts, seed=5, drafter=DrafterInput(nnx.split(drafter)[1]), max_new=max_new)
    assert out.tokens == ref.tokens
    assert {d[4] for d in out.decisions if d[2] == "rollout"} > {"plain"}  # speculation ran too
    assert generate(model, prompts, hot, max_new=max_new, seed=6).tokens != ref.tokens


def test_group_and_hybrid_arms_keep_greedy_outputs(setup):
    """Groups (rows 0-3 share a prompt, 4-7 another), the group proposer before the drafter is warm and the hybrid
    after, rows compacted away while their siblings run, a second rollout drafting from the store: greedy outputs
    equal plain decoding's."""
    model, drafter, prompts, max_new, _ = setup
    grouped = [prompts[0]] * 4 + [prompts[2]] * 4
    ref = generate(model, grouped, SPEC, max_new=max_new, seed=0)
    g, dg = nnx.split(model)[0], nnx.split(drafter)[0]
    config = EngineConfig(sd_threshold=4, arms=("hybrid:3_2_5@sampled",), ngram_arms=("group:chain-2",),
                          plain_arm=False, group_store=2)
    eng = AdaptiveEngine(g, SPEC, config, batch_size=8, cache_len=64, drafter_graphdef=dg)
    params, dstate = nnx.split(model)[1], nnx.split(drafter)[1]
    for use_drafter in (False, True, True):
        out = eng.generate(params, grouped, seed=0, drafter=DrafterInput(dstate, proposes=use_drafter),
                           max_new=max_new)
        assert out.tokens == ref.tokens
        assert {d[4] for d in out.decisions if d[2] == "rollout" and d[3] <= 4} == {
            "hybrid:3_2_5@sampled" if use_drafter else "group:chain-2"}
        assert min(d[3] for d in out.decisions if d[2] == "rollout") < eng.top_bucket
    assert len(eng.store) == 2


def test_precompile_reports_the_pool(setup):
    model, drafter, prompts, max_new, ref = setup
    eng = _engine(model, drafter, 2, jax.devices()[:1], arms=("chain-2",))
    stats = eng.precompile(nnx.split(model)[1], nnx.split(drafter)[1])
    # buckets 4 (plain only), 2 and 1 (plain + 1 learned + 1 n-gram arm); two replicas sharing one device
    # share their programs
    assert stats["programs"] == 1 + 2 * 3 and stats["compile_s"] > 0
    small = _engine(model, drafter, 2, jax.devices()[:1], max_programs=4)
    with pytest.raises(ConfigError, match="max_programs"):
        small.precompile(nnx.split(model)[1], nnx.split(drafter)[1])
    with pytest.raises(InputError, match="8 rows"):
        eng.generate(nnx.split(model)[1], prompts[:4], seed=0)


class _Recorder(SpotTrainer):
    """The real spot trainer, recording which replica ran each step and what the engine knew then."""

    def begin(self, replicas, policy_params):
        super().begin(replicas, policy_params)
        self.calls = []

    def step(self, replica_index):
        self.calls.append(replica_index)
        return super().step(replica_index)


def test_spot_training_runs_only_on_finished_replicas(setup):
    model, drafter, prompts, max_new, ref = setup
    # 2 replicas of 4 rows on 4 devices; replica 0 holds the one long answer (40 tokens)
    eng = _engine(model, drafter, 2, jax.devices()[:4], arms=("chain-2",))
    buf = DrafterBuffer(capacity=64, window=64, max_step_lag=2)
    answers = ref.tokens
    # the trainer's layout: left-padded prompts, then the answers
    p = max(len(x) for x in prompts)
    lay = np.zeros((8, p + 40), np.int32)
    ok = np.zeros((8, p + 40), bool)
    for i, (pr, an) in enumerate(zip(prompts, answers)):
        lay[i, p - len(pr):p], ok[i, p - len(pr):p] = pr, True
        lay[i, p:p + len(an)], ok[i, p:p + len(an)] = an, True
    feats = np.asarray(target_features(model, lay, ok))
    assert buf.add(0, lay, feats, ok, answer_start=p) > 0
    dg, dparams, frozen = split_drafter(drafter)
    before = jax.tree.map(np.asarray, dparams)
    spot = _Recorder(dg, dparams, frozen, nnx.split(model)[0], buf, make_optimizer(1e-3), rows=2, seq_len=32)
    spot.rl_step = 1
    out = eng.generate(nnx.split(model)[1], prompts, seed=0, max_new=max_new,
                       drafter=DrafterInput(nnx.split(drafter)[1], trainer=spot))
    assert out.tokens == ref.tokens  # training beside the rollout changes nothing in it
    # every drafter step was decided for a replica with no live rows, after its rows were all done
    live_at = {}
    for chunk, rep, action, bucket, arm in out.decisions:
        if action == "rollout":
            live_at[rep] = chunk
        else:
            assert live_at.get(rep, -1) < chunk
    trained = {d[1] for d in out.decisions if d[2] == "drafter"}
    assert trained == {1}  # the replica with the long answer never trained
    assert sorted(set(spot.calls)) == sorted(trained)
    assert out.stats["spot_steps"] == len(spot.calls) > 0
    assert out.stats["drafter_replicas_trained"] == len(trained)
    assert np.isfinite(out.stats["drafter_loss"]) and out.stats["idle_device_s"] > 0
    after = jax.tree.map(np.asarray, spot.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # nothing eligible (the buffer holds only the current step): no drafter step is run
    spot.rl_step = 0
    out = eng.generate(nnx.split(model)[1], prompts, seed=0, max_new=max_new,
                       drafter=DrafterInput(nnx.split(drafter)[1], trainer=spot))
    assert out.stats["spot_steps"] == 0 and out.tokens == ref.tokens
