"""Factories: the things a config names, loaded and wired (model, tokenizer, task prompts, reward function,
drafter, rollout). Training and evaluation build theirs here, so both run the same rollout path.

Everything here reads the config through ``app.specs`` (typed, checked specs) and hands plain objects to the
layers below, which never see a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tlt_jax.app import specs
from tlt_jax.core.errors import CheckpointError, ConfigError, DataError
from tlt_jax.core.seeds import stream_seed
from tlt_jax.data.loader import load_examples, with_instruction
from tlt_jax.drafter.online import OnlineDrafter
from tlt_jax.drafter.warmup import warm_up_drafter
from tlt_jax.engine.adaptive import AdaptiveEngine
from tlt_jax.io.checkpoint import latest_step
from tlt_jax.io.drafter import load_drafter
from tlt_jax.io.tokenizer import cache_root, chat_prompt_ids, load_tokenizer, stop_token_ids
from tlt_jax.io.weights import load_checkpoint
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.sharding import param_shardings, shard_model
from tlt_jax.rl.rewards import math_rewards
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


# ------------------------------------------------------------------------------------------------ task, reward


def task_prompts(config, tokenizer, source: Dict[str, Any], log: Callable[[str], None] = print,
                 what: str = "data") -> Tuple[List[List[int]], List[str], List[str]]:
    """(prompt token ids, question texts, gold answers) of a data source (``specs.data_source`` or
    ``specs.eval_source``), as chat prompts; prompts longer than ``rollout.max_prompt_len`` are skipped
    (and counted in a log line). ``what`` names the config section in messages."""
    kw = {k: v for k, v in source.items() if k != "instruction"}
    try:
        examples = load_examples(kw.pop("source"), **kw)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    if not examples:
        raise DataError(f"{what}.source {source['source']!r} gave no examples")
    questions = [with_instruction(q, source["instruction"]) for q, _ in examples]
    ids = chat_prompt_ids(tokenizer, questions, config.job.system_prompt or None,
                          enable_thinking=bool(config.data.enable_thinking))
    limit = int(config.rollout.max_prompt_len)
    keep = [i for i, p in enumerate(ids) if len(p) <= limit]
    if not keep:
        raise DataError(f"every {what} prompt is longer than rollout.max_prompt_len={limit} tokens")
    if len(keep) < len(ids):
        log(f"[tlt] skipping {len(ids) - len(keep)} of {len(ids)} {what} prompts longer than "
            f"rollout.max_prompt_len={limit}")
    return [ids[i] for i in keep], [questions[i] for i in keep], [examples[i].answer for i in keep]


def reward_fn(config) -> Callable:
    """``rl.reward``: 'math' (math-verify with ``rl.format_weight``) or 'module.path:function' (called as
    fn(answers, golds, finished) -> RewardOutput or floats)."""
    name, weight = config.rl.reward, float(config.rl.format_weight)
    if name == "math":
        def math_reward(answers, golds, finished):
            return math_rewards(answers, golds, finished, format_weight=weight)
        return math_reward
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from None


# ------------------------------------------------------------------------------------------------ TLT parts


def first_warmup(config, model: Decoder, tokenizer, directory: str, train: bool,
                 log: Callable[[str], None] = print) -> Optional[Drafter]:
    """The run's own warmed drafter (``tlt.warmup_at_start``, no warmed drafter elsewhere): the one in
    ``directory`` if an earlier start of this run made it, else (``train``) a short warm-up into ``directory``
    first (``specs.first_warmup_spec``); None when it does not apply (another process of a multi-process job
    would write the same directory, or there is no real target)."""
    if latest_step(directory) is not None:  # (a warm-up killed before it saved left only its data: redo it)
        drafter, _ = load_drafter(directory, model)
        log(f"[tlt] the run's own warmed drafter ({directory})")
        return drafter
    if not train or tokenizer is None or not config.model.checkpoint:
        return None
    if jax.process_count() > 1:
        log("[tlt] tlt.warmup_at_start: no short warm-up in a multi-process job (run tlt-warmup first)")
        return None
    spec = specs.first_warmup_spec(config)
    log(f"[tlt] no warmed drafter: a short warm-up first ({spec.num_prompts} prompts, {spec.steps} steps, at most "
        f"{spec.time_budget_s:.0f}s; tlt-warmup --config {config.name} does the full one) into {directory}")
    warm_up_drafter(model, tokenizer, spec, out=directory, stop_tokens=stop_tokens(config, tokenizer),
                    system=config.job.system_prompt or None, data_key=[config.name, config.model.checkpoint],
                    log=log)
    drafter, _ = load_drafter(directory, model)
    return drafter


def online_drafter(config, model: Decoder, graphdef, model_cfg: ModelConfig, log: Callable[[str], None] = print,
                   train: bool = True, tokenizer=None, warmup_dir: Optional[str] = None
                   ) -> Tuple[Optional[SpeculativeSpec], Optional[OnlineDrafter]]:
    """The speculation and the drafter of a run (``tlt.*``, ``speculative.*``): (None, None) for the baseline;
    the warmed drafter if one exists; else with ``tlt.warmup_at_start`` the run's own from a short warm-up
    (:func:`first_warmup`, in ``warmup_dir``); else with spot training a fresh drafter that trains on idle
    replicas (the model-free arms draft until it is warm), else the n-gram proposer (no drafter). ``train``
    False keeps the structure but builds no spot trainer and warms nothing up (evaluation of a checkpoint)."""
    c, t = config, config.tlt
    if not t.enable:
        log("[tlt] baseline: plain rollouts (tlt.enable=False)")
        return None, None
    spot = specs.spot_spec(c) if (t.adaptive and t.spot_training) else None
    online = dict(target_graphdef=graphdef, spot=spot if train else None,
                  optimizer=specs.spot_optimizer(c) if (spot and train) else None, seed=int(c.seed), log=log)
    try:
        speculation, drafter = speculation_from_config(c, model)
    except CheckpointError as e:
        own = (first_warmup(c, model, tokenizer, warmup_dir, train, log)
               if t.warmup_at_start and warmup_dir and specs.speculative_spec(c).learned else None)
        if own is not None:
            speculation, drafter = specs.speculative_spec(c), own
        else:
            reason = str(e).split(". ")[0]  # the first sentence: what is missing where
            if spot is not None:
                log(f"[tlt] no warmed drafter ({reason}); a fresh one trains on idle replicas "
                    f"and the model-free arms (tlt.ngram_arms) draft until it has had {spot.warm_after} updates")
                log("[tlt] TLT: speculative rollouts, the model-free arms until the drafter is warm")
                fresh = Drafter(model_cfg, nnx.Rngs(stream_seed(int(c.seed), "drafter_init")))
                return specs.speculative_spec(c), OnlineDrafter(fresh, warm=False, **online)
            speculation, drafter = ngram_fallback(c), None
            log(f"[tlt] no warmed drafter ({reason}); the n-gram proposer drafts")
    log(f"[tlt] TLT: speculative rollouts, {speculation.strategy.name} with the {speculation.proposer} proposer")
    return speculation, (OnlineDrafter(drafter, warm=True, **online) if drafter is not None else None)


def rollout(config, graphdef, model_cfg: ModelConfig, spec: RolloutSpec, *, batch_size: int,
            speculation: Optional[SpeculativeSpec], online: Optional[OnlineDrafter], mesh: Mesh,
            devices: Sequence[jax.Device], pool=None) -> Tuple[host.Rollout, Optional[AdaptiveEngine]]:
    """The run's rollout for answers as ``spec`` says, and the adaptive engine if it is one: the baseline's
    plain rollout over the training mesh (``speculation`` None); with TLT the adaptive engine over the
    replicas (``batch_size`` rows a call; ``pool``: a program pool to share), or (``tlt.adaptive=False``) the
    fixed strategy on one local device (every process runs the whole batch)."""
    if speculation is None:
        return fixed_rollout(config, graphdef, model_cfg, spec, mesh=mesh), None
    if not config.tlt.adaptive:
        drafter = online.drafter if online is not None else None
        return fixed_rollout(config, graphdef, model_cfg, spec, speculation=speculation, drafter=drafter,
                             mesh=one_device_mesh()), None
    engine = AdaptiveEngine(graphdef, spec, specs.engine_config(config), batch_size=batch_size,
                            cache_len=specs.fixed_cache_len(config),
                            drafter_graphdef=online.graphdef if online is not None else None,
                            pool=pool, devices=devices, prompt_multiple=int(config.rl.prompt_multiple))
    return engine, engine
