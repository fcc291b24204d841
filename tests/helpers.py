"""Shared test helpers: the tiny random model of configs/tiny.py."""

import functools
import json

from flax import nnx

from tlt_jax.config import load_config, model_config_from_arch
from tlt_jax.models import Decoder


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, dtype: str = "float32"):
    c = load_config("tiny", [f"model.dtype={dtype}", f"model.param_dtype={dtype}"])
    cfg = model_config_from_arch(c)
    return cfg, Decoder(cfg, nnx.Rngs(seed))


def train_drafter(model, prompts, *, steps: int = 150, new_tokens: int = 24, seed: int = 0, lr: float = 3e-3,
                  temperature: float = 0.0):
    """A drafter warmed on the model's own answers to ``prompts`` (the warm-up recipe, at test scale)."""
    import numpy as np

    from tlt_jax.drafter.loss import target_features
    from tlt_jax.drafter.train import make_optimizer, split_drafter, train_step
    from tlt_jax.drafter.warmup import pack
    from tlt_jax.models.drafter import Drafter
    from tlt_jax.rollout import RolloutSpec, SamplingParams, generate

    spec = RolloutSpec(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=temperature), chunk_steps=8)
    answers = generate(model, prompts, spec, seed=seed).tokens
    seq_len = max(len(p) for p in prompts) + new_tokens
    tokens, valid, loss_mask = pack(prompts, answers, seq_len, 0)
    feats = target_features(model, tokens, valid)
    drafter = Drafter(model.cfg, nnx.Rngs(seed + 1))
    dgraphdef, dparams, drest = split_drafter(drafter)
    tgraphdef, tparams = nnx.split(model)
    opt = make_optimizer(lr, steps)
    opt_state = opt.init(dparams)
    for _ in range(steps):
        dparams, opt_state, metrics = train_step(dparams, drest, opt_state, tparams, tokens, feats, loss_mask,
                                                 dgraphdef=dgraphdef, tgraphdef=tgraphdef, optimizer=opt)
    return nnx.merge(dgraphdef, dparams, drest), {k: float(np.asarray(v)) for k, v in metrics.items()}


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON; strict parsers reject them)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)
