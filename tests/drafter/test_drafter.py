"""The EAGLE drafter: shared embedding/head, training signal, checkpoints tied to their target (the warm-up
command: tests/cli)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_model, train_drafter
from tlt_jax.core.errors import CheckpointError
from tlt_jax.drafter.loss import distribution_overlap, drafter_loss, target_features
from tlt_jax.drafter.warmup import choose_draft_vocab, pack
from tlt_jax.io.drafter import load_drafter, save_drafter
from tlt_jax.models import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import RolloutSpec, generate


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 200, size=int(rng.integers(4, 10))).tolist() for _ in range(n)]


def test_drafter_owns_no_embedding_or_head():
    cfg, model = tiny_model()
    d = Drafter(cfg, nnx.Rngs(0), draft_vocab=np.arange(0, 64))
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(d, nnx.Param))}
    assert not any("embed" in n or "lm_head" in n for n in names), names
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(d, nnx.Param)))
    n_layer = sum(x.size for x in jax.tree.leaves(nnx.state(model.layers[0], nnx.Param)))
    assert n_params < n_layer + 2 * cfg.hidden_size * cfg.hidden_size + cfg.hidden_size + 1
    w = d.head_weight(model)  # the policy's own head rows, gathered
    head = model.embed_tokens.embedding[...] if cfg.tie_embeddings else model.lm_head.kernel[...].T
    np.testing.assert_array_equal(np.asarray(w), np.asarray(head[:64]))


def test_training_lowers_the_loss_and_agrees_with_the_target():
    cfg, model = tiny_model()
    prompts = _prompts(8)
    _, first = train_drafter(model, prompts, steps=1, new_tokens=16)
    drafter, last = train_drafter(model, prompts, steps=120, new_tokens=16)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["top1"] > first["top1"] + 0.2, (first, last)


def test_distribution_term_at_the_rollout_temperature():
    """The loss's KL term at T adds dist_weight x KL to the EAGLE loss; its TV metric (draft vocabulary) equals
    1 - the full-vocabulary overlap the warm-up reports when the draft vocabulary is the whole vocabulary, and a
    drafter trained to the target gets closer to it (the overlap grows)."""
    cfg, model = tiny_model()
    prompts = _prompts(4)
    answers = generate(model, prompts, RolloutSpec(max_new_tokens=12)).tokens
    tokens, valid, loss_mask = (jnp.asarray(x) for x in pack(prompts, answers, 24, 0))
    feats = target_features(model, tokens, valid)
    fresh, _ = train_drafter(model, prompts, steps=1, new_tokens=12)
    trained, _ = train_drafter(model, prompts, steps=120, new_tokens=12)
    overlaps = []
    for drafter in (fresh, trained):
        head = drafter.head_weight(model)
        plain, m0 = drafter_loss(drafter, model, tokens, feats, loss_mask, head)
        loss, m = drafter_loss(drafter, model, tokens, feats, loss_mask, head, temperature=0.7, dist_weight=0.5)
        np.testing.assert_allclose(float(loss), float(plain) + 0.5 * float(m["kl"]), rtol=1e-5)
        assert float(m["kl"]) >= 0 and 0 <= float(m["tv"]) <= 1 and "kl" not in m0
        overlap = float(distribution_overlap(drafter, model, tokens, feats, loss_mask, 0.7))
        np.testing.assert_allclose(overlap, 1.0 - float(m["tv"]), atol=1e-5)
        overlaps.append(overlap)
    assert overlaps[1] > overlaps[0] + 0.05, overlaps


def test_draft_vocabulary_keeps_stop_tokens_and_frequent_ids():
    answers = [[5, 5, 5, 7, 9], [5, 7, 11]]
    ids = choose_draft_vocab(answers, 3, 32, always=(31,))
    assert ids.tolist() == [5, 7, 31]
    assert choose_draft_vocab(answers, 0, 32) is None


def test_save_load_roundtrip_and_other_target_rejected(tmp_path):
    cfg, model = tiny_model()
    d = Drafter(cfg, nnx.Rngs(3), draft_vocab=np.arange(10, 90))
    save_drafter(str(tmp_path / "d"), d, model, step=5, extra={"note": "x"})
    back, meta = load_drafter(str(tmp_path / "d"), model)
    assert meta["extra"]["note"] == "x"
    for a, b in zip(jax.tree.leaves(nnx.state(d)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a same-shaped target with other weights
    other = Decoder(cfg, nnx.Rngs(123))
    with pytest.raises(CheckpointError, match="another target of the same shape"):
        load_drafter(str(tmp_path / "d"), other)
    # a target of another shape
    bigger = Decoder(cfg.replace(hidden_size=cfg.hidden_size * 2, head_dim=cfg.head_dim * 2), nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="trained for another target"):
        load_drafter(str(tmp_path / "d"), bigger)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_drafter(str(tmp_path / "missing"), model)
