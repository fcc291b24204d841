"""ml_collections configs: the schema (the shared defaults), loading a config file, ``--config.a.b=v``
overrides. Every value is checked once, by ``app.specs``, when a config is loaded.

Every file in ``configs/`` defines ``get_config()`` returning a ConfigDict built on :func:`base_config`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import ml_collections

from tlt_jax.app.specs import validate
from tlt_jax.core.errors import ConfigError
from tlt_jax.data.tasks import INSTRUCTION as TASK_INSTRUCTION
from tlt_jax.models.config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

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


def qwen3_config(name: str, checkpoint: str, **arch) -> ml_collections.ConfigDict:
    """A dense Qwen3 model's config (``configs/qwen3_*.py``): the family's shared architecture (per-head q/k
    RMSNorm, no qkv bias, head_dim 128, vocabulary 151936, RoPE theta 1e6, 40960 positions), bfloat16, the
    model's published sizes in ``arch``."""
    c = base_config()
    c.name = name
    c.model.checkpoint = checkpoint
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.arch = arch_dict(**{**dict(architecture="qwen3", vocab_size=151936, head_dim=128, rope_theta=1e6,
                                       rms_norm_eps=1e-6, qkv_bias=False, qk_norm=True,
                                       max_position_embeddings=40960), **arch})
    c.rollout.stop_strings = ("<|im_end|>",)
    c.train.remat = True
    return c


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
    # How answers are generated, for every command (RL rollouts, tlt-generate, benchmarks): the one source of the
    # length budget and the sampling distribution (the RL log-prob forward uses the same temperature).
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=8,  # tlt-generate / tlt-inspect batch (an RL step's is rl.prompts_per_step x rl.group_size)
        max_prompt_len=256,
        max_new_tokens=128,
        cache_len=0,  # 0: prompt width + max_new_tokens, rounded up to 64
        chunk_steps=16,
        temperature=1.0,  # 0: greedy (not for RL, which samples)
        top_p=1.0,
        top_k=0,
        stop_strings=("<|im_end|>",),
    ))
    c.speculative = ml_collections.ConfigDict(dict(
        enable=False,  # the A/B switch: False decodes plainly
        strategy="chain-4",  # 'chain-D' or 'D_K_V' (depth, top-k, verified tokens), e.g. '6_4_16'
        # 'eagle' (the learned drafter), 'ngram' (model-free, the row's own text), 'group' (model-free, the row's,
        # its siblings' and its prompt's earlier answers) or 'hybrid' (group when its match is long, else eagle)
        proposer="eagle",
        # 'target_only' (deterministic drafts), 'sampled' (drafts from the drafter's q) or 'auto' (sampled where
        # the learned drafter drafts, target_only for the model-free proposers); engine arms without '@rule' follow
        rule="auto",
        ngram_max=3,  # the n-gram proposer's longest match
        ngram_min=1,  # the shortest match that drafts (n-gram and group proposers)
        suffix_max=8,  # the group proposer's longest match
        hybrid_min=4,  # the hybrid drafts from the texts when its match is at least this long
        group_sources=16,  # texts a row searches (own, siblings, stored answers)
        group_store=4,  # earlier answers kept per prompt for the group proposer (0: none)
    ))
    c.drafter = ml_collections.ConfigDict(dict(
        checkpoint="",  # '' = <cache dir>/drafters/<config name>
        draft_vocab=8192,  # ids the drafter proposes from (most frequent in its warm-up data); 0 = all
        dist_weight=0.1,  # the loss's KL term at rollout.temperature, offline and online (0: the EAGLE loss alone)
    ))
    c.drafter.warmup = ml_collections.ConfigDict(dict(
        num_prompts=128,  # task prompts answered by the target (self-distillation data)
        eval_prompts=8,  # held-out prompts for the acceptance estimate
        max_new_tokens=192,
        temperatures=(0.0, 1.0),  # answers are generated at these temperatures, in equal shares (greedy and RL's)
        eval_temperatures=(0.0, 0.7, 1.0),  # held-out acceptance at these (and 1 - TV at the non-zero ones)
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
    c.mesh.train_devices = 0  # the training mesh: the first this-many devices of every process (0: all)
    # ---- RL training (tlt-train)
    c.tlt = ml_collections.ConfigDict(dict(
        enable=True,  # the A/B switch: True = speculative rollouts (TLT), False = plain rollouts (baseline)
        adaptive=True,  # the adaptive engine; False: speculative.strategy on the whole batch, all the way
        replicas=2,  # rollout replicas (sub-meshes of the devices); finished ones train the drafter
        replica_tensor=1,  # tensor parallelism inside a replica: devices per model copy (big models)
        sd_threshold=32,  # speculation is considered once a replica's live rows fit this bucket
        arms=("chain-4", "4_2_8"),  # BEG-MAB arms with the learned drafter or the hybrid (rule: speculative.rule)
        ngram_arms=("group:chain-3",),  # model-free arms while the drafter is not warm (TLT-Base: the only ones)
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
        # no warmed drafter: first a short warm-up (drafter.warmup.* with these sizes) into <workdir>/drafter,
        # so the run's first rollouts already speculate with a learned drafter (False: a fresh drafter learns
        # online and the model-free arms draft until it is warm)
        warmup_at_start=False,
        warmup_prompts=48,
        warmup_steps=150,
        warmup_budget_s=300.0,
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
        enable_thinking=True,  # the chat template's thinking switch (Qwen3; other templates ignore it)
    ))
    c.rl = ml_collections.ConfigDict(dict(
        steps=10,
        prompts_per_step=4,
        group_size=4,  # G answers per prompt (sampled as rollout.* says)
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
        # the answer width of the log-prob forward (the batch) and of each mini-batch's update: the smallest of
        # cap, cap/2, ... (this many widths) that holds its longest answer; 1: always the cap
        answer_buckets=4,
    ))
    # Held-out evaluation (tlt-eval, and during training every eval.every steps): the data options of `data`
    # ('' = as data.*), sampled answers per problem at eval.temperature plus a greedy pass, through the run's
    # rollout path (the adaptive engine with TLT, plain decoding for the baseline)
    c.eval = ml_collections.ConfigDict(dict(
        every=0,  # RL steps between evaluations during training (0: none; tlt-eval evaluates a checkpoint any time)
        at_start=False,  # also evaluate the initial policy (step 0) before the first RL step
        source="",  # '' = data.source ('arithmetic': the problems of eval.seed, not those of data.seed)
        subset="",  # '' = data.subset
        split="test",  # the held-out split of a hub dataset (a local file is read whole: name its own file)
        question_field="",  # '' = data.question_field
        answer_field="",  # '' = data.answer_field
        answer_format="",  # '' = data.answer_format
        limit=64,  # the first N problems (0: all)
        samples=4,  # sampled answers per problem (mean@n, pass@k)
        temperature=-1.0,  # < 0: rollout.temperature
        greedy=True,  # also one greedy answer per problem (greedy_accuracy)
        k=(),  # pass@k for these k (each <= eval.samples); () = 1 and eval.samples
        batch_size=0,  # rows per rollout call (0: the training batch, rl.prompts_per_step x rl.group_size)
        seed=1,  # the arithmetic task's problems and the sampling streams (the same for every evaluation)
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
    if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
        return type(current)([value])  # one value for a list key: --config.eval.k=8
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
