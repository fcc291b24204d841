"""ml_collections configs: the shared defaults, loading a config file, ``--config.a.b=v`` overrides, checks.

Every file in ``configs/`` defines ``get_config()`` returning a ConfigDict built on :func:`base_config`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import ml_collections

from tlt_jax.data.tasks import INSTRUCTION as TASK_INSTRUCTION
from tlt_jax.errors import ConfigError
from tlt_jax.models.config import ModelConfig, RopeScaling

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

SAMPLE_PROMPTS = (
    "What is 12 + 35?",
    "Name three primary colors.",
    "Write one sentence about the moon.",
    "If a train travels 60 km in 1.5 hours, what is its average speed?",
)


def arch_dict(**kw) -> ml_collections.ConfigDict:
    """Architecture fields of :class:`ModelConfig` (used for random init and for weight-free checks)."""
    base = {f: getattr(ModelConfig(), f) for f in ModelConfig.__dataclass_fields__
            if f not in ("rope_scaling", "param_dtype", "dtype")}
    base["rope_scaling"] = None
    base.update(kw)
    return ml_collections.ConfigDict(base)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        # A safetensors directory, a .gguf file, 'embedded:smollm2', or '' for a random model from `arch`.
        checkpoint="",
        tokenizer="",  # '' = the checkpoint's own tokenizer (none for random models)
        param_dtype="float32",
        dtype="float32",
        attn_impl="auto",  # 'auto' (Pallas kernel on GPU/TPU, jnp reference on CPU), 'reference', 'pallas_gpu', ...
    ))
    c.model.arch = arch_dict()
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=8,
        max_prompt_len=256,
        max_new_tokens=128,
        cache_len=0,  # 0: prompt width + max_new_tokens, rounded up to 64
        chunk_steps=16,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        stop_strings=("<|im_end|>",),
    ))
    c.speculative = ml_collections.ConfigDict(dict(
        enable=False,  # the A/B switch: False decodes plainly
        strategy="chain-4",  # 'chain-D' or 'D_K_V' (depth, top-k, verified tokens), e.g. '6_4_16'
        proposer="eagle",  # 'eagle' (the learned drafter) or 'ngram' (model-free, chains only)
        ngram_max=3,
        ngram_min=1,
    ))
    c.drafter = ml_collections.ConfigDict(dict(
        checkpoint="",  # '' = <cache dir>/drafters/<config name>
        draft_vocab=8192,  # ids the drafter proposes from (most frequent in its warm-up data); 0 = all
    ))
    c.drafter.warmup = ml_collections.ConfigDict(dict(
        num_prompts=128,  # task prompts answered by the target (self-distillation data)
        eval_prompts=8,  # held-out prompts for the acceptance estimate
        max_new_tokens=192,
        temperatures=(0.0, 1.0),  # answers are generated at these temperatures, in equal shares
        gen_batch=32,
        steps=400,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        weight_decay=0.1,
        feature_noise=0.2,  # uniform noise in [-x, x] on the drafter's input features while training
        time_budget_s=720.0,  # training stops early (and says so) past this budget
        data_seed=1,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: all remaining devices
    c.mesh.cpu_devices = 0  # CPU hosts: split the host into this many XLA devices at start-up (0: as is)
    # ---- RL training (tlt-train)
    c.tlt = ml_collections.ConfigDict(dict(
        enable=True,  # the A/B switch: True = speculative rollouts (TLT), False = plain rollouts (baseline)
        adaptive=True,  # the adaptive engine; False: speculative.strategy on the whole batch, all the way
        replicas=2,  # rollout replicas (sub-meshes of the devices); finished ones train the drafter
        replica_tensor=1,  # tensor parallelism inside a replica: devices per model copy (big models)
        sd_threshold=32,  # speculation is considered once a replica's live rows fit this bucket
        arms=("chain-4", "4_2_8"),  # BEG-MAB arms with the learned drafter (per bucket <= sd_threshold)
        ngram_arms=("ngram:chain-3",),  # arms while the drafter is not warm (TLT-Base: the only ones)
        plain_arm=True,  # plain decoding competes with the strategies (speculation must pay for itself)
        epsilon=0.1,  # bandit exploration rate
        window=8,  # bandit reward window (median)
        compact=True,  # compact live rows into power-of-two buckets as rows finish
        max_programs=64,  # bound of the compiled-program pool
        spot_training=True,  # train the drafter on finished replicas; False keeps it frozen
        spot_rows=4,  # packed rows per drafter update
        spot_seq_len=256,
        spot_lr=3e-4,
        spot_weight_decay=0.0,
        spot_noise=0.0,  # uniform noise on the drafter's input features while training
        spot_max_steps=0,  # drafter updates per replica and rollout (0: until the rollout ends)
        warm_after=20,  # a drafter that was never warmed proposes after this many online updates
        buffer_capacity=256,  # answers held by the drafter data buffer
        buffer_window=512,  # the last <= this many tokens of an answer are kept
        buffer_lag=2,  # features of the last this-many RL steps are sampled (never the current one)
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="arithmetic",  # 'arithmetic' (generated, offline), a hub name, or a local .json/.jsonl/.parquet
        subset="",
        split="train",
        question_field="question",
        answer_field="answer",
        answer_format="raw",  # 'raw', 'gsm8k' (after '####') or 'boxed' (last \\boxed{} of a solution)
        limit=0,  # > 0: use the first N examples
        instruction=TASK_INSTRUCTION,  # appended to questions that do not mention \\boxed
        mean_terms=2.0,  # the arithmetic task's mean number of terms (answer lengths grow with it)
        seed=0,
        shuffle=True,  # reshuffled every epoch (seeded)
    ))
    c.rl = ml_collections.ConfigDict(dict(
        steps=10,
        prompts_per_step=4,
        group_size=4,  # G answers per prompt
        max_new_tokens=128,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        lr=1e-6,
        weight_decay=0.0,
        grad_clip=1.0,
        warmup_steps=0,
        minibatches=2,  # optimizer steps per RL step (the batch is split)
        clip_eps=0.2,
        kl_coef=0.0,  # > 0: k3 KL to the frozen initial policy
        advantage="grpo",  # 'grpo' (group-normalised) or 'drgrpo' (no std division)
        aggregation="token_mean",  # 'token_mean' or 'seq_mean'
        reward="math",  # 'math' (math-verify on the boxed answer) or 'module.path:function'
        format_weight=0.1,  # extra reward for a finished answer with a boxed result
        prompt_multiple=32,  # prompts are padded to a multiple of this (fewer compiled shapes)
    ))
    c.train = ml_collections.ConfigDict(dict(
        checkpoint_every=2,  # RL steps between checkpoints (the last step is always saved)
        keep_checkpoints=2,
        plots=True,  # PNG plots in the work dir at the end
        tensorboard=True,
        remat=False,  # recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)
    ))
    c.job = ml_collections.ConfigDict(dict(prompts=SAMPLE_PROMPTS, system_prompt=""))
    return c


# ------------------------------------------------------------------------------------------------ loading


def resolve_config_path(name_or_path: str) -> str:
    """'configs/tiny.py', 'tiny.py' or 'tiny' -> a path to an existing config file."""
    candidates = [name_or_path]
    base = os.path.basename(name_or_path)
    if not base.endswith(".py"):
        base += ".py"
    candidates.append(os.path.join(CONFIG_DIR, base))
    for c in candidates:
        if os.path.isfile(c):
            return c
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
    raise ConfigError(f"config file {name_or_path!r} not found; known configs: {known}")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path = resolve_config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"tlt_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = module.get_config()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_all_keys(v, prefix + k + "."))
    return out


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}")
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if isinstance(current, (list, tuple)) and isinstance(value, str):
        return type(current)([value])
    if type(value) is not type(current):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies 'a.b=v' strings (the part after '--config.'). Unknown keys raise ConfigError."""
    keys = _all_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like a.b=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        parent = cfg
        *path, leaf = key.split(".")
        for p in path:
            parent = parent[p]
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields instead")
        with parent.unlocked():
            parent[leaf] = _parse_value(text, current, key)


def split_config_args(argv: Sequence[str]) -> Tuple[Optional[str], List[str], List[str]]:
    """Splits argv into (config path, ['a.b=v', ...], other args). Accepts --config.a.b=v and --config.a.b v."""
    path, overrides, rest = None, [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                body = body + "=" + argv[i + 1]
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return path, overrides, rest


# ------------------------------------------------------------------------------------------------ checks


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Range checks with messages that name the key."""
    r = cfg.rollout
    if not (0.0 < float(r.top_p) <= 1.0):
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if float(r.temperature) < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {r.temperature}")
    if int(r.top_k) < 0:
        raise ConfigError(f"rollout.top_k must be >= 0, got {r.top_k}")
    for key in ("batch_size", "max_prompt_len", "max_new_tokens", "chunk_steps"):
        if int(r[key]) < 1:
            raise ConfigError(f"rollout.{key} must be >= 1, got {r[key]}")
    if int(r.cache_len) < 0:
        raise ConfigError(f"rollout.cache_len must be >= 0 (0 = automatic), got {r.cache_len}")
    if r.cache_len and int(r.cache_len) <= int(r.max_prompt_len):
        raise ConfigError(f"rollout.cache_len ({r.cache_len}) must exceed rollout.max_prompt_len "
                          f"({r.max_prompt_len})")
    for axis in ("data", "fsdp", "tensor"):
        v = int(cfg.mesh[axis])
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1 (fill), got {v}")
    if int(cfg.mesh.get("cpu_devices", 0)) < 0:
        raise ConfigError(f"mesh.cpu_devices must be >= 0, got {cfg.mesh.cpu_devices}")
    if sum(int(cfg.mesh[a]) == -1 for a in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    for key in ("param_dtype", "dtype"):
        if cfg.model[key] not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model.{key} must be float32, bfloat16, float16 or float64, got {cfg.model[key]!r}")
    from kernels_pallas.attention import NAMES as ATTN_IMPLS

    if cfg.model.attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"model.attn_impl must be one of {list(ATTN_IMPLS)}, got {cfg.model.attn_impl!r}")
    sp = cfg.speculative
    from tlt_jax.rollout.tree import SpecStrategy  # local: keeps config import light

    strategy = SpecStrategy.parse(sp.strategy)
    if sp.proposer not in ("eagle", "ngram"):
        raise ConfigError(f"speculative.proposer must be 'eagle' or 'ngram', got {sp.proposer!r}")
    if sp.proposer == "ngram" and not strategy.is_chain:
        raise ConfigError(f"speculative.proposer 'ngram' drafts chains only; got strategy {sp.strategy!r}")
    if not 1 <= int(sp.ngram_min) <= int(sp.ngram_max):
        raise ConfigError(f"need 1 <= speculative.ngram_min <= speculative.ngram_max, got "
                          f"{sp.ngram_min}, {sp.ngram_max}")
    if int(cfg.drafter.draft_vocab) < 0:
        raise ConfigError(f"drafter.draft_vocab must be >= 0 (0 = full vocabulary), got {cfg.drafter.draft_vocab}")
    w = cfg.drafter.warmup
    for key in ("num_prompts", "eval_prompts", "max_new_tokens", "gen_batch", "steps", "batch_size", "seq_len"):
        if int(w[key]) < 1:
            raise ConfigError(f"drafter.warmup.{key} must be >= 1, got {w[key]}")
    if not w.temperatures or any(float(t) < 0 for t in w.temperatures):
        raise ConfigError(f"drafter.warmup.temperatures must be non-negative values, got {w.temperatures}")
    if float(w.lr) <= 0 or float(w.time_budget_s) <= 0:
        raise ConfigError("drafter.warmup.lr and drafter.warmup.time_budget_s must be positive")
    if float(w.weight_decay) < 0 or float(w.feature_noise) < 0:
        raise ConfigError("drafter.warmup.weight_decay and drafter.warmup.feature_noise must be >= 0")
    _validate_rl(cfg)
    if not cfg.model.checkpoint:
        model_config_from_arch(cfg)  # raises on a bad architecture


def _validate_rl(cfg: ml_collections.ConfigDict) -> None:
    rl = cfg.rl
    for key in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "minibatches", "prompt_multiple"):
        if int(rl[key]) < 1:
            raise ConfigError(f"rl.{key} must be >= 1, got {rl[key]}")
    if int(rl.group_size) < 2:
        raise ConfigError(f"rl.group_size must be >= 2 (advantages compare answers in a group), got {rl.group_size}")
    rows = int(rl.prompts_per_step) * int(rl.group_size)
    if rows % int(rl.minibatches):
        raise ConfigError(f"rl.minibatches ({rl.minibatches}) must divide prompts_per_step x group_size ({rows})")
    if float(rl.temperature) <= 0:
        raise ConfigError(f"rl.temperature must be > 0 (GRPO samples its answers), got {rl.temperature}")
    if not (0.0 < float(rl.top_p) <= 1.0):
        raise ConfigError(f"rl.top_p must be in (0, 1], got {rl.top_p}")
    if int(rl.top_k) < 0:
        raise ConfigError(f"rl.top_k must be >= 0, got {rl.top_k}")
    if float(rl.lr) <= 0:
        raise ConfigError(f"rl.lr must be > 0, got {rl.lr}")
    for key in ("weight_decay", "kl_coef", "format_weight", "warmup_steps"):
        if float(rl[key]) < 0:
            raise ConfigError(f"rl.{key} must be >= 0, got {rl[key]}")
    if float(rl.grad_clip) <= 0 or not 0 < float(rl.clip_eps) < 1:
        raise ConfigError(f"need rl.grad_clip > 0 and 0 < rl.clip_eps < 1, got {rl.grad_clip}, {rl.clip_eps}")
    if rl.advantage not in ("grpo", "drgrpo"):
        raise ConfigError(f"rl.advantage must be 'grpo' or 'drgrpo', got {rl.advantage!r}")
    if rl.aggregation not in ("token_mean", "seq_mean"):
        raise ConfigError(f"rl.aggregation must be 'token_mean' or 'seq_mean', got {rl.aggregation!r}")
    if rl.reward != "math" and ":" not in rl.reward:
        raise ConfigError(f"rl.reward must be 'math' or 'module.path:function', got {rl.reward!r}")
    if cfg.data.answer_format not in ("raw", "gsm8k", "boxed"):
        raise ConfigError(f"data.answer_format must be 'raw', 'gsm8k' or 'boxed', got {cfg.data.answer_format!r}")
    if int(cfg.data.limit) < 0 or float(cfg.data.mean_terms) < 1:
        raise ConfigError("data.limit must be >= 0 and data.mean_terms >= 1")
    if int(cfg.train.checkpoint_every) < 1 or int(cfg.train.keep_checkpoints) < 1:
        raise ConfigError("train.checkpoint_every and train.keep_checkpoints must be >= 1")
    t = cfg.tlt
    if int(t.buffer_window) < 2:
        raise ConfigError(f"tlt.buffer_window must be >= 2 (a sequence needs a token to predict), got "
                          f"{t.buffer_window}")
    for key in ("replicas", "replica_tensor", "max_programs", "spot_rows", "buffer_capacity", "buffer_lag", "window"):
        if int(t[key]) < 1:
            raise ConfigError(f"tlt.{key} must be >= 1, got {t[key]}")
    for key in ("sd_threshold", "spot_max_steps", "warm_after", "spot_weight_decay", "spot_noise"):
        if float(t[key]) < 0:
            raise ConfigError(f"tlt.{key} must be >= 0, got {t[key]}")
    if int(t.spot_seq_len) < 2 or float(t.spot_lr) <= 0 or not 0 <= float(t.epsilon) <= 1:
        raise ConfigError("need tlt.spot_seq_len >= 2, tlt.spot_lr > 0 and 0 <= tlt.epsilon <= 1")
    if rows % int(t.replicas):
        raise ConfigError(f"tlt.replicas ({t.replicas}) must divide the rollout batch prompts_per_step x "
                          f"group_size ({rows})")
    if t.enable and t.adaptive:
        from tlt_jax.engine.adaptive import EngineConfig  # local: keeps config import light

        EngineConfig.from_config(cfg)  # checks the arms


def model_config_from_arch(cfg: ml_collections.ConfigDict) -> ModelConfig:
    a = dict(cfg.model.arch.to_dict())
    rs = a.pop("rope_scaling", None)
    if rs:
        rs = RopeScaling(**dict(rs))
    try:
        return ModelConfig(**a, rope_scaling=rs, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    except TypeError as e:
        raise ConfigError(f"model.arch: {e}") from e
