"""A config turned into typed specs, once: every value is checked here, and each message names its key.

One source of truth per setting: the ``rollout`` section says how answers are generated for every command
(the RL job, ``tlt-generate``, the benchmarks): ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``chunk_steps``, ``cache_len`` and the stop strings. The GRPO log-prob forward uses the same temperature (the
policy's probabilities are those of the distribution the answers were sampled from). ``rl`` holds only the
optimisation (steps, group size, learning rate, loss), and the RL job refuses ``rollout.temperature = 0``.

Builders: :func:`model_config`, :func:`mesh_sizes`, :func:`train_mesh`, :func:`sampling_params`, :func:`rollout_spec`,
:func:`speculative_spec`, :func:`engine_config`, :func:`grpo_config`, :func:`policy_optimizer`,
:func:`spot_optimizer`, :func:`warmup_spec`, :func:`spot_spec`, :func:`data_source`, :func:`eval_source`,
:func:`eval_settings`, :func:`eval_rollout_specs`; :func:`validate` runs every check.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from kernels_pallas.attention import NAMES as ATTENTION_IMPLEMENTATIONS
from tlt_jax.core.errors import ConfigError
from tlt_jax.core.optim import make_optimizer
from tlt_jax.core.shapes import default_cache_len, round_up
from tlt_jax.data.loader import ANSWER_FORMATS
from tlt_jax.drafter.spot import SpotSpec
from tlt_jax.drafter.warmup import WarmupSpec
from tlt_jax.engine.adaptive import EngineConfig
from tlt_jax.models.config import ModelConfig, RopeScaling
from tlt_jax.parallel.mesh import MESH_AXES, first_local, make_mesh
from tlt_jax.rl.evaluation import EvalSettings
from tlt_jax.rl.grpo import ADVANTAGES, AGGREGATIONS, GRPOConfig
from tlt_jax.rollout.acceptance import RULES
from tlt_jax.rollout.decode import RolloutSpec
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import LEARNED, PROPOSERS, SpeculativeSpec
from tlt_jax.rollout.suffix import GroupStore
from tlt_jax.rollout.tree import SpecStrategy

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _at_least(section: ml_collections.ConfigDict, name: str, keys: Sequence[str], low: float,
              what: str = "") -> None:
    for key in keys:
        if float(section[key]) < low:
            raise ConfigError(f"{name}.{key} must be >= {low:g}{what}, got {section[key]}")


# ------------------------------------------------------------------------------------------------ model, mesh


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture of ``model.arch`` (random models and weight-free checks; a checkpoint brings its own)."""
    a = dict(config.model.arch.to_dict())
    scaling = a.pop("rope_scaling", None)
    try:
        return ModelConfig(**a, rope_scaling=RopeScaling(**dict(scaling)) if scaling else None,
                           param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    except TypeError as e:
        raise ConfigError(f"model.arch: {e}") from e


def _check_model(config) -> None:
    for key in ("param_dtype", "dtype"):
        if config.model[key] not in DTYPES:
            raise ConfigError(f"model.{key} must be float32, bfloat16, float16 or float64, got {config.model[key]!r}")
    if config.model.attn_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_impl must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got "
                          f"{config.model.attn_impl!r}")
    if not config.model.checkpoint:
        model_config(config)  # raises on a bad architecture


def mesh_sizes(config) -> Dict[str, int]:
    """``mesh.data`` / ``fsdp`` / ``tensor`` (each positive or -1 = fill, at most one -1) for ``make_mesh``."""
    sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
    for axis, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1 (fill), got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    return sizes


def cpu_devices(config) -> int:
    """``mesh.cpu_devices``: XLA devices a CPU host is split into at start-up (0: as is)."""
    n = int(config.mesh.get("cpu_devices", 0))
    if n < 0:
        raise ConfigError(f"mesh.cpu_devices must be >= 0, got {n}")
    return n


def train_devices(config) -> int:
    """``mesh.train_devices``: the training mesh (log-prob forward, update, checkpoints) takes the first this-many
    devices of every process (0: all of them; the rollout replicas always use all)."""
    n = int(config.mesh.get("train_devices", 0))
    if n < 0:
        raise ConfigError(f"mesh.train_devices must be >= 0, got {n}")
    return n


def train_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The training mesh (the log-prob forward, the update, checkpoints): ``mesh.*`` over ``devices`` (default:
    every device of every process), or over the first ``mesh.train_devices`` of every process."""
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(mesh_sizes(config), first_local(devices, train_devices(config)))


# ------------------------------------------------------------------------------------------------ rollout


def sampling_params(config) -> SamplingParams:
    r = config.rollout
    if not (0.0 < float(r.top_p) <= 1.0):
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if float(r.temperature) < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {r.temperature}")
    if int(r.top_k) < 0:
        raise ConfigError(f"rollout.top_k must be >= 0, got {r.top_k}")
    return SamplingParams(float(r.temperature), int(r.top_k), float(r.top_p))


def rollout_spec(config, stop_tokens: Sequence[int] = ()) -> RolloutSpec:
    """The static rollout settings of ``rollout.*`` (``stop_tokens``: the ids of ``rollout.stop_strings``)."""
    r = config.rollout
    _at_least(r, "rollout", ("batch_size", "max_prompt_len", "max_new_tokens", "chunk_steps"), 1)
    return RolloutSpec(max_new_tokens=int(r.max_new_tokens), stop_tokens=tuple(int(t) for t in stop_tokens),
                       sampling=sampling_params(config), chunk_steps=int(r.chunk_steps),
                       attn_impl=config.model.attn_impl)


def cache_len(config) -> Optional[int]:
    """``rollout.cache_len`` (None: sized per batch from the prompt width and ``rollout.max_new_tokens``)."""
    r = config.rollout
    if int(r.cache_len) < 0:
        raise ConfigError(f"rollout.cache_len must be >= 0 (0 = automatic), got {r.cache_len}")
    if r.cache_len and int(r.cache_len) <= int(r.max_prompt_len):
        raise ConfigError(f"rollout.cache_len ({r.cache_len}) must exceed rollout.max_prompt_len "
                          f"({r.max_prompt_len})")
    return int(r.cache_len) or None


def fixed_cache_len(config) -> int:
    """One cache length for every batch (the adaptive engine's programs): ``rollout.cache_len``, or the widest
    prompt (``rollout.max_prompt_len`` rounded up to 8) plus ``rollout.max_new_tokens``."""
    return cache_len(config) or default_cache_len(round_up(int(config.rollout.max_prompt_len), 8),
                                                  int(config.rollout.max_new_tokens))


def speculative_spec(config) -> SpeculativeSpec:
    """``speculative.*`` as a SpeculativeSpec; a bad value names its key."""
    sp = config.speculative
    try:
        strategy = SpecStrategy.parse(sp.strategy)
    except ConfigError as e:
        raise ConfigError(f"speculative.strategy: {e}") from None
    if sp.proposer not in PROPOSERS or sp.proposer == "none":
        raise ConfigError(f"speculative.proposer must be one of {list(PROPOSERS[:-1])}, got {sp.proposer!r}")
    if sp.rule not in RULES + ("auto",):
        raise ConfigError(f"speculative.rule must be one of {list(RULES) + ['auto']}, got {sp.rule!r}")
    # auto: the sampled rule wherever the learned drafter drafts (at T = 0 it is the target-only walk)
    rule = ("sampled" if sp.proposer in LEARNED else "target_only") if sp.rule == "auto" else sp.rule
    _at_least(sp, "speculative", ("group_sources",), 1)
    _at_least(sp, "speculative", ("group_store",), 0, " (0: no answers kept across rollouts)")
    try:
        return SpeculativeSpec(strategy, proposer=sp.proposer, rule=rule, ngram_max=int(sp.ngram_max),
                               ngram_min=int(sp.ngram_min), suffix_max=int(sp.suffix_max),
                               hybrid_min=int(sp.hybrid_min))
    except ConfigError as e:
        raise ConfigError(f"speculative.*: {e}") from None


def group_store(config) -> Optional[GroupStore]:
    """The store of earlier answers by prompt for the group proposer (``speculative.group_store`` per prompt)."""
    n = int(config.speculative.group_store)
    return GroupStore(n) if n > 0 else None


def engine_config(config) -> EngineConfig:
    """The adaptive engine's settings (``tlt.*``), its arms checked."""
    t, sp = config.tlt, config.speculative
    _at_least(t, "tlt", ("replicas", "replica_tensor", "max_programs", "window"), 1)
    _at_least(t, "tlt", ("sd_threshold",), 0, " (0: never speculate)")
    if not 0 <= float(t.epsilon) <= 1:
        raise ConfigError(f"tlt.epsilon must be in [0, 1], got {t.epsilon}")
    base = speculative_spec(config)
    named = {}  # the arms by their full names (the rule an arm without one follows made explicit)
    for name, arms, learned in (("tlt.arms", t.arms, True), ("tlt.ngram_arms", t.ngram_arms, False)):
        named[name] = []
        for arm in arms:
            try:
                speculation = base.with_arm(arm)
            except ConfigError as e:
                raise ConfigError(f"{name}: arm {arm!r}: {e}") from None
            if speculation.learned != learned:
                raise ConfigError(f"{name}: {arm!r} is not a {'learned-drafter' if learned else 'model-free'} "
                                  f"strategy")
            named[name].append(speculation.arm)
    if not t.plain_arm and (not t.arms or not t.ngram_arms):
        raise ConfigError("without the plain arm, tlt.arms and tlt.ngram_arms must both be non-empty")
    return EngineConfig(replicas=int(t.replicas), replica_tensor=int(t.replica_tensor),
                        sd_threshold=int(t.sd_threshold), arms=tuple(named["tlt.arms"]),
                        ngram_arms=tuple(named["tlt.ngram_arms"]),
                        plain_arm=bool(t.plain_arm), epsilon=float(t.epsilon), window=int(t.window),
                        compact=bool(t.compact), max_programs=int(t.max_programs), speculation=base,
                        group_sources=int(sp.group_sources), group_store=int(sp.group_store),
                        seed=int(config.seed))


# ------------------------------------------------------------------------------------------------ training


def rows_per_step(config) -> int:
    """Answers per RL step: ``rl.prompts_per_step`` x ``rl.group_size``."""
    return int(config.rl.prompts_per_step) * int(config.rl.group_size)


def grpo_config(config) -> GRPOConfig:
    """The loss settings (``rl.*``) and the rollout's temperature, which the RL job needs to be > 0."""
    rl = config.rl
    if float(config.rollout.temperature) <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 for RL (GRPO samples its answers), got "
                          f"{config.rollout.temperature}")
    _check_loss(config)
    return GRPOConfig(clip_eps=float(rl.clip_eps), kl_coef=float(rl.kl_coef), aggregation=rl.aggregation,
                      temperature=float(config.rollout.temperature), remat=bool(config.train.remat))


def _check_loss(config) -> None:
    rl = config.rl
    if float(rl.grad_clip) <= 0 or not 0 < float(rl.clip_eps) < 1:
        raise ConfigError(f"need rl.grad_clip > 0 and 0 < rl.clip_eps < 1, got {rl.grad_clip}, {rl.clip_eps}")
    if rl.advantage not in ADVANTAGES:
        raise ConfigError(f"rl.advantage must be 'grpo' or 'drgrpo', got {rl.advantage!r}")
    if rl.aggregation not in AGGREGATIONS:
        raise ConfigError(f"rl.aggregation must be 'token_mean' or 'seq_mean', got {rl.aggregation!r}")


def policy_optimizer(config) -> optax.GradientTransformation:
    rl = config.rl
    if float(rl.lr) <= 0:
        raise ConfigError(f"rl.lr must be > 0, got {rl.lr}")
    return make_optimizer(float(rl.lr), weight_decay=float(rl.weight_decay), clip=float(rl.grad_clip),
                          warmup_steps=int(rl.warmup_steps))


def spot_optimizer(config) -> optax.GradientTransformation:
    """The online drafter optimizer: open-ended, so a constant learning rate."""
    t = config.tlt
    if float(t.spot_lr) <= 0:
        raise ConfigError(f"tlt.spot_lr must be > 0, got {t.spot_lr}")
    return make_optimizer(float(t.spot_lr), weight_decay=float(t.spot_weight_decay))


def spot_spec(config) -> SpotSpec:
    t = config.tlt
    _at_least(t, "tlt", ("spot_rows", "buffer_capacity", "buffer_lag"), 1)
    _at_least(t, "tlt", ("spot_max_steps", "warm_after", "spot_weight_decay", "spot_noise"), 0)
    if int(t.buffer_window) < 2:
        raise ConfigError(f"tlt.buffer_window must be >= 2 (a sequence needs a token to predict), got "
                          f"{t.buffer_window}")
    if int(t.spot_seq_len) < 2:
        raise ConfigError(f"tlt.spot_seq_len must be >= 2, got {t.spot_seq_len}")
    return SpotSpec(rows=int(t.spot_rows), seq_len=int(t.spot_seq_len), noise=float(t.spot_noise),
                    max_steps_per_rollout=int(t.spot_max_steps), warm_after=int(t.warm_after),
                    buffer_capacity=int(t.buffer_capacity), buffer_window=int(t.buffer_window),
                    buffer_lag=int(t.buffer_lag), temperature=float(config.rollout.temperature),
                    dist_weight=dist_weight(config))


def dist_weight(config) -> float:
    """``drafter.dist_weight``: the weight of the drafter loss's KL term at ``rollout.temperature``."""
    if float(config.drafter.dist_weight) < 0:
        raise ConfigError(f"drafter.dist_weight must be >= 0, got {config.drafter.dist_weight}")
    return float(config.drafter.dist_weight)


def warmup_spec(config) -> WarmupSpec:
    w = config.drafter.warmup
    _at_least(w, "drafter.warmup", ("num_prompts", "eval_prompts", "max_new_tokens", "gen_batch", "steps",
                                    "batch_size", "seq_len"), 1)
    if not w.temperatures or any(float(t) < 0 for t in w.temperatures):
        raise ConfigError(f"drafter.warmup.temperatures must be non-negative values, got {w.temperatures}")
    if not w.eval_temperatures or any(float(t) < 0 for t in w.eval_temperatures):
        raise ConfigError(f"drafter.warmup.eval_temperatures must be non-negative values, got {w.eval_temperatures}")
    if float(w.lr) <= 0 or float(w.time_budget_s) <= 0:
        raise ConfigError("drafter.warmup.lr and drafter.warmup.time_budget_s must be positive")
    if float(w.weight_decay) < 0 or float(w.feature_noise) < 0:
        raise ConfigError("drafter.warmup.weight_decay and drafter.warmup.feature_noise must be >= 0")
    if int(config.drafter.draft_vocab) < 0:
        raise ConfigError(f"drafter.draft_vocab must be >= 0 (0 = full vocabulary), got {config.drafter.draft_vocab}")
    return WarmupSpec(num_prompts=int(w.num_prompts), eval_prompts=int(w.eval_prompts),
                      max_new_tokens=int(w.max_new_tokens), temperatures=tuple(float(t) for t in w.temperatures),
                      gen_batch=int(w.gen_batch), steps=int(w.steps), batch_size=int(w.batch_size),
                      seq_len=int(w.seq_len), lr=float(w.lr), weight_decay=float(w.weight_decay),
                      feature_noise=float(w.feature_noise), time_budget_s=float(w.time_budget_s),
                      data_seed=int(w.data_seed), draft_vocab=int(config.drafter.draft_vocab),
                      seed=int(config.seed), dist_temperature=float(config.rollout.temperature),
                      dist_weight=dist_weight(config),
                      eval_temperatures=tuple(float(t) for t in w.eval_temperatures))


def first_warmup_spec(config) -> WarmupSpec:
    """The short warm-up a run does first when it has no warmed drafter (``tlt.warmup_at_start``):
    :func:`warmup_spec` with ``tlt.warmup_prompts`` prompts, ``tlt.warmup_steps`` steps, ``tlt.warmup_budget_s``
    seconds and a held-out check at the rollout temperature only."""
    t = config.tlt
    _at_least(t, "tlt", ("warmup_prompts", "warmup_steps"), 1)
    if float(t.warmup_budget_s) <= 0:
        raise ConfigError(f"tlt.warmup_budget_s must be > 0, got {t.warmup_budget_s}")
    spec = warmup_spec(config)
    return spec._replace(num_prompts=int(t.warmup_prompts), steps=int(t.warmup_steps),
                         time_budget_s=float(t.warmup_budget_s), eval_prompts=min(spec.eval_prompts, 4),
                         eval_temperatures=(float(config.rollout.temperature),))


def _check_rl(config) -> None:
    rl = config.rl
    _at_least(rl, "rl", ("steps", "prompts_per_step", "minibatches", "prompt_multiple", "answer_buckets"), 1)
    if int(rl.group_size) < 2:
        raise ConfigError(f"rl.group_size must be >= 2 (advantages compare answers in a group), got {rl.group_size}")
    rows = rows_per_step(config)
    if rows % int(rl.minibatches):
        raise ConfigError(f"rl.minibatches ({rl.minibatches}) must divide prompts_per_step x group_size ({rows})")
    _at_least(rl, "rl", ("weight_decay", "kl_coef", "format_weight", "warmup_steps"), 0)
    if rl.reward != "math" and ":" not in rl.reward:
        raise ConfigError(f"rl.reward must be 'math' or 'module.path:function', got {rl.reward!r}")
    if config.data.answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"data.answer_format must be 'raw', 'gsm8k' or 'boxed', got {config.data.answer_format!r}")
    if int(config.data.limit) < 0 or float(config.data.mean_terms) < 1:
        raise ConfigError("data.limit must be >= 0 and data.mean_terms >= 1")
    if int(config.train.checkpoint_every) < 1 or int(config.train.keep_checkpoints) < 1:
        raise ConfigError("train.checkpoint_every and train.keep_checkpoints must be >= 1")
    if rows % int(config.tlt.replicas):
        raise ConfigError(f"tlt.replicas ({config.tlt.replicas}) must divide the rollout batch prompts_per_step x "
                          f"group_size ({rows})")


# ------------------------------------------------------------------------------------------------ data, evaluation

DATA_FIELDS = ("source", "subset", "split", "question_field", "answer_field", "answer_format")


def data_source(config) -> Dict[str, Any]:
    """The training data (``data.*``) as keyword arguments of ``data.loader.load_examples``, plus the
    ``instruction``; ``limit`` 0 for the arithmetic task means as many problems as the run's steps use."""
    d = config.data
    n_needed = int(config.rl.steps) * int(config.rl.prompts_per_step)
    limit = int(d.limit) if int(d.limit) > 0 else (n_needed if d.source == "arithmetic" else 0)
    return dict({k: d[k] for k in DATA_FIELDS}, limit=limit, seed=int(d.seed), mean_terms=float(d.mean_terms),
                instruction=d.instruction)


def _is_local(source: str) -> bool:
    return os.path.splitext(source)[1].lower() in (".json", ".jsonl", ".parquet") or os.path.isdir(source)


def eval_source(config) -> Dict[str, Any]:
    """The held-out data (``eval.*``, '' taking ``data.*``'s value) as :func:`data_source` gives the training
    data; an evaluation that would score the training problems is a ConfigError."""
    e, d = config.eval, config.data
    out = {k: (e[k] if e[k] != "" else d[k]) for k in DATA_FIELDS}
    out["split"] = e.split
    if out["answer_format"] not in ANSWER_FORMATS:
        raise ConfigError(f"eval.answer_format must be one of {list(ANSWER_FORMATS)} (or '' for data.answer_format), "
                          f"got {out['answer_format']!r}")
    if out["source"] == "arithmetic" and int(e.seed) == int(d.seed):
        raise ConfigError(f"eval.seed ({e.seed}) equals data.seed: the held-out arithmetic problems would be the "
                          f"training problems; give eval.seed another value")
    if not e.source and _is_local(d.source):
        raise ConfigError(f"eval.source is empty, so it would be data.source {d.source!r}, a local file read whole "
                          f"(its split is only a name): give the held-out file as eval.source")
    if out["source"] != "arithmetic" and (out["source"], out["subset"], out["split"]) == (d.source, d.subset, d.split):
        raise ConfigError(f"eval.source, eval.subset and eval.split name the training data ({d.source!r}, split "
                          f"{d.split!r}); evaluate on held-out problems")
    return dict(out, limit=int(e.limit), seed=int(e.seed), mean_terms=float(d.mean_terms), instruction=d.instruction)


def eval_settings(config) -> EvalSettings:
    """``eval.samples``, ``eval.k`` (default: 1 and the sample count), ``eval.greedy``, the batch and the seed."""
    e = config.eval
    _at_least(e, "eval", ("every", "limit", "batch_size"), 0)
    _at_least(e, "eval", ("samples",), 1)
    n = int(e.samples)
    ks = tuple(int(k) for k in e.k) if len(e.k) else tuple(sorted({1, n}))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"eval.k: pass@k needs 1 <= k <= eval.samples ({n}); {bad} "
                          f"{'is' if len(bad) == 1 else 'are'} out of range (raise eval.samples or lower eval.k)")
    batch = int(e.batch_size) or rows_per_step(config)
    if config.tlt.enable and config.tlt.adaptive and batch % int(config.tlt.replicas):
        raise ConfigError(f"eval.batch_size ({batch}) must split over tlt.replicas ({config.tlt.replicas})")
    return EvalSettings(samples=n, ks=ks, greedy=bool(e.greedy), batch_size=batch, seed=int(e.seed))


def eval_temperature(config) -> float:
    """``eval.temperature``, or ``rollout.temperature`` when it is negative; the sampled pass needs it > 0."""
    t = float(config.eval.temperature)
    t = float(config.rollout.temperature) if t < 0 else t
    if t <= 0:
        raise ConfigError(f"the evaluation's sampled answers need a temperature > 0 (eval.temperature, or "
                          f"rollout.temperature when it is < 0), got {t}; the greedy pass is eval.greedy")
    return t


def eval_rollout_specs(config, stop_tokens: Sequence[int] = ()) -> Tuple[RolloutSpec, RolloutSpec]:
    """(sampled, greedy) rollout specs of the evaluation: ``rollout.*`` at :func:`eval_temperature` and at 0."""
    spec = rollout_spec(config, stop_tokens)
    sampled = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling,
                                                                      temperature=eval_temperature(config)))
    return sampled, dataclasses.replace(spec, sampling=SamplingParams(0.0, 0, 1.0))


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check of every section (``load_config`` runs it): a bad value is a ConfigError naming its key.
    (``rollout.temperature`` > 0 is checked when an RL job builds its :func:`grpo_config`: ``tlt-generate``
    may decode greedily.)"""
    rollout_spec(config)
    cache_len(config)
    mesh_sizes(config)
    cpu_devices(config)
    train_devices(config)
    _check_model(config)
    speculative_spec(config)
    warmup_spec(config)
    _check_rl(config)
    _check_loss(config)
    policy_optimizer(config)
    spot_optimizer(config)
    spot_spec(config)
    first_warmup_spec(config)
    engine_config(config)
    eval_settings(config)
