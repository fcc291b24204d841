"""Factories: the things a config names, loaded and wired (model, tokenizer, drafter, rollout).

Everything here reads the config through ``app.specs`` (typed, checked specs) and hands plain objects to the
layers below, which never see a ConfigDict.
"""

from __future__ import annotations

import dataclasses

import os
from typing import Optional, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tlt_jax.app import specs
from tlt_jax.core.errors import CheckpointError, ConfigError
from tlt_jax.core.seeds import stream_seed
from tlt_jax.io.drafter import load_drafter
from tlt_jax.io.tokenizer import cache_root, load_tokenizer, stop_token_ids
from tlt_jax.io.weights import load_checkpoint
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.sharding import param_shardings, shard_model
from tlt_jax.rollout.decode import RolloutSpec
from tlt_jax.rollout import host
from tlt_jax.rollout.speculative import SpeculativeSpec
from tlt_jax.rollout.tree import SpecStrategy

WARMUP_COMMAND = "tlt-warmup --config <this config>"


def model_from_config(config, mesh: Optional[Mesh] = None) -> Tuple[ModelConfig, Decoder]:
    """The model a config names: its checkpoint, or a random model from ``model.arch`` (seeded).

    With ``mesh``, parameters are placed by the sharding rules as they are loaded.
    """
    shardings_fn = (lambda cfg: param_shardings(cfg, mesh)) if mesh is not None else None
    m = config.model
    if m.checkpoint:
        return load_checkpoint(m.checkpoint, param_dtype=m.param_dtype, dtype=m.dtype, shardings_fn=shardings_fn)
    cfg = specs.model_config(config)
    model = Decoder(cfg, rngs=nnx.Rngs(stream_seed(int(config.seed), "policy_init")))
    if mesh is not None:
        model = shard_model(model, mesh)
    return cfg, model


def tokenizer_from_config(config, what: str):
    """The tokenizer of ``model.tokenizer`` or of the checkpoint (``what`` names the command that needs it)."""
    path = config.model.tokenizer or config.model.checkpoint
    if not path:
        raise ConfigError(f"{what} needs a tokenizer: set model.checkpoint or model.tokenizer")
    return load_tokenizer(path)


def stop_tokens(config, tokenizer) -> Tuple[int, ...]:
    """The ids of ``rollout.stop_strings`` plus the tokenizer's EOS."""
    return tuple(stop_token_ids(tokenizer, config.rollout.stop_strings))


def default_drafter_dir(config) -> str:
    """``drafter.checkpoint``, or ``<cache dir>/drafters/<config name>`` (where ``tlt-warmup`` saves)."""
    if config.drafter.checkpoint:
        return os.path.abspath(os.path.expanduser(config.drafter.checkpoint))
    return os.path.join(cache_root(), "drafters", config.name)


def warmed_drafter(config, model: Decoder) -> Drafter:
    """The warmed drafter for this very target; a missing or mismatched one is a CheckpointError that says how
    to make one."""
    directory = default_drafter_dir(config)
    try:
        drafter, _ = load_drafter(directory, model)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Warm a drafter first ({WARMUP_COMMAND}) or use "
                              f"--config.speculative.proposer=ngram") from None
    return drafter


def speculation_from_config(config, model: Decoder) -> Tuple[SpeculativeSpec, Optional[Drafter]]:
    """(SpeculativeSpec, drafter or None) from the ``speculative`` and ``drafter`` config sections."""
    speculation = specs.speculative_spec(config)
    if not speculation.learned:
        return speculation, None
    return speculation, warmed_drafter(config, model)


def ngram_fallback(config) -> SpeculativeSpec:
    """The n-gram proposer on the chain of ``speculative.strategy`` (a tree strategy's depth as a chain)."""
    speculation = specs.speculative_spec(config)
    strategy = speculation.strategy
    if not strategy.is_chain:
        strategy = SpecStrategy(depth=strategy.depth)
    return dataclasses.replace(speculation, strategy=strategy, proposer="ngram", rule="target_only")


def fixed_rollout(config, graphdef, model_cfg: ModelConfig, spec: RolloutSpec, *,
                  speculation: Optional[SpeculativeSpec] = None, drafter: Optional[Drafter] = None,
                  mesh: Optional[Mesh] = None):
    """``rollout.host.fixed_rollout`` with the config's cache length (``rollout.cache_len``) and, for speculation,
    its group proposer's sources and store (``speculative.group_sources`` / ``group_store``)."""
    return host.fixed_rollout(graphdef, model_cfg, spec, speculation=speculation, drafter=drafter,
                              cache_len=specs.cache_len(config), mesh=mesh,
                              group_sources=int(config.speculative.group_sources),
                              store=specs.group_store(config) if speculation is not None else None)


def one_device_mesh() -> Mesh:
    """A mesh of this process's first device (a rollout that every process runs whole)."""
    return Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
