"""Shared test helpers: the tiny random model of configs/tiny.py, a warmed tiny drafter, strict JSON, and the
commands run as a user runs them (a process of their own)."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
from flax import nnx

from tests.multiproc import child_env
from tlt_jax.app.config import load_config
from tlt_jax.app.specs import model_config
from tlt_jax.core.optim import make_optimizer
from tlt_jax.drafter.loss import target_features
from tlt_jax.drafter.train import split_drafter, train_step
from tlt_jax.drafter.warmup import pack
from tlt_jax.models import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import RolloutSpec, SamplingParams, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, dtype: str = "float32"):
    c = load_config("tiny", [f"model.dtype={dtype}", f"model.param_dtype={dtype}"])
    cfg = model_config(c)
    return cfg, Decoder(cfg, nnx.Rngs(seed))


def train_drafter(model, prompts, *, steps: int = 150, new_tokens: int = 24, seed: int = 0, lr: float = 3e-3,
                  temperature: float = 0.0):
    """A drafter warmed on the model's own answers to ``prompts`` (the warm-up recipe, at test scale)."""
    spec = RolloutSpec(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=temperature), chunk_steps=8)
    answers = generate(model, prompts, spec, seed=seed).tokens
    seq_len = max(len(p) for p in prompts) + new_tokens
    tokens, valid, loss_mask = pack(prompts, answers, seq_len, 0)
    feats = target_features(model, tokens, valid)
    drafter = Drafter(model.cfg, nnx.Rngs(seed + 1))
    graphdef, params, frozen = split_drafter(drafter)
    target_graphdef, target_params = nnx.split(model)
    opt = make_optimizer(lr, warmup_steps=20, cosine_steps=steps)
    opt_state = opt.init(params)
    for _ in range(steps):
        params, opt_state, metrics = train_step(params, frozen, opt_state, target_params, tokens, feats, loss_mask,
                                                drafter_graphdef=graphdef, target_graphdef=target_graphdef,
                                                optimizer=opt)
    return nnx.merge(graphdef, params, frozen), {k: float(np.asarray(v)) for k, v in metrics.items()}


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON; strict parsers reject them)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def run_command(module: str, args, *, timeout: float = 900, env=None, devices: int = 0) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, with this process's environment (offline, the
    test device count, or ``devices`` CPU devices: 2 is what ``mesh.cpu_devices`` gives the CPU configs, one per
    rollout replica, where the tests' 8 would shard every program over 4 times as many devices on the same
    cores); stdout and stderr captured as text."""
    base = child_env(devices) if devices else os.environ
    full = dict(base, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module] + [str(a) for a in args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)
