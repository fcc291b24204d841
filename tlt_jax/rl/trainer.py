"""The GRPO trainer: rollout -> rewards -> advantages -> actor log-prob forward -> policy update.

Everything a step needs is a function of (config, step, state), so a run resumed from a checkpoint continues
exactly: the rollout's random seed and the prompts of step ``s`` are derived from ``s``; the checkpoint holds
the policy, its optimizer state, the drafter (when there is one), the step and the data position.

Work dir layout::

    metrics.jsonl        one JSON object per RL step (reward_mean, accuracy, lengths, time split, ...);
                         strict JSON: a value not measured yet (drafter_loss before the first drafter
                         step) is null
    samples.jsonl        the first answer to each prompt of every step (question, gold, answer, reward)
    tb/                  TensorBoard events of the same metrics
    checkpoints/<step>/  orbax checkpoints (the newest ``train.keep_checkpoints``)
    plots/*.png          reward, answer lengths and time split, written at the end
    config.json          the config of the first run in this dir
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax import checkpoint
from tlt_jax.errors import CheckpointError, ConfigError, DataError
from tlt_jax.jsonio import json_line
from tlt_jax.parallel import sharding as shd
from tlt_jax.rl import grpo
from tlt_jax.rl.rewards import RewardOutput, math_rewards, safe_rewards

FORMAT = "tlt_jax.grpo_trainer.v1"
CKPT_DIR = "checkpoints"


def _leaves(tree) -> Dict[str, Any]:
    """A pytree as a flat {'00000': leaf} dict (orbax-friendly whatever the container types)."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _unleaves(like, flat: Dict[str, Any]):
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise CheckpointError(f"checkpoint holds {len(flat)} arrays where {len(leaves)} are expected")
    return jax.tree.unflatten(treedef, [flat[f"{i:05d}"] for i in range(len(leaves))])


def _abstract(flat: Dict[str, Any]) -> Dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and (for arrays) shardings: orbax restores each array laid out as the live one is."""
    return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in flat.items()}


def load_reward_fn(name: str, format_weight: float) -> Callable:
    """'math' or 'module.path:function' (called as fn(answers, golds, finished) -> RewardOutput or floats)."""
    if name == "math":
        def math_reward(answers, golds, finished):
            return math_rewards(answers, golds, finished, format_weight=format_weight)
        return math_reward
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from None


def percentiles(lengths: Sequence[int]) -> Dict[str, float]:
    x = np.asarray(lengths, np.float64)
    return {"len_mean": float(x.mean()), "len_p50": float(np.percentile(x, 50)),
            "len_p75": float(np.percentile(x, 75)), "len_p90": float(np.percentile(x, 90)),
            "len_max": float(x.max())}


class Trainer:
    """Holds the run's state; :meth:`run` trains to ``rl.steps``."""

    def __init__(self, config, workdir: str, *, resume: bool = False, log: Callable[[str], None] = print,
                 pool=None, devices: Optional[Sequence[jax.Device]] = None):
        from tlt_jax.data.loader import load_examples
        from tlt_jax.models.tokenizer import load_tokenizer, stop_token_ids
        from tlt_jax.models.weights import model_from_config
        from tlt_jax.rollout import RolloutSpec, SamplingParams

        self.config = config
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.ckpt_dir = os.path.join(self.workdir, CKPT_DIR)
        self.log = log
        self.devices = list(jax.devices() if devices is None else devices)  # training mesh and rollout replicas
        rl = config.rl
        existing = checkpoint.latest_step(self.ckpt_dir)
        if existing is not None and not resume:
            raise CheckpointError(f"{self.workdir} already holds a run (checkpoint step {existing}); pass --resume "
                                  f"to continue it or choose another --workdir")
        if resume and existing is None:
            log(f"[tlt] --resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
        os.makedirs(self.workdir, exist_ok=True)

        t0 = time.perf_counter()
        self.model_cfg, model = model_from_config(config, None)
        tok_path = config.model.tokenizer or config.model.checkpoint
        if not tok_path:
            raise ConfigError("training needs a tokenizer: set model.checkpoint or model.tokenizer")
        self.tokenizer = load_tokenizer(tok_path)
        self.graphdef, params = nnx.split(model)
        self._place_policy(params)
        log(f"[tlt] model {self.model_cfg.architecture} {self.model_cfg.num_params() / 1e6:.1f}M params, "
            f"loaded in {time.perf_counter() - t0:.1f}s")

        d = config.data
        n_needed = int(rl.steps) * int(rl.prompts_per_step)
        limit = int(d.limit) if int(d.limit) > 0 else (n_needed if d.source == "arithmetic" else 0)
        self.examples = load_examples(d.source, subset=d.subset, split=d.split, question_field=d.question_field,
                                      answer_field=d.answer_field, answer_format=d.answer_format, limit=limit,
                                      seed=int(d.seed), mean_terms=float(d.mean_terms))
        self._encode_prompts()
        self.stop_tokens = tuple(stop_token_ids(self.tokenizer, config.rollout.stop_strings))
        self.spec = RolloutSpec(max_new_tokens=int(rl.max_new_tokens), stop_tokens=self.stop_tokens,
                                sampling=SamplingParams(float(rl.temperature), int(rl.top_k), float(rl.top_p)),
                                chunk_steps=int(config.rollout.chunk_steps), attn_impl=config.model.attn_impl)
        self.gcfg = grpo.GRPOConfig(clip_eps=float(rl.clip_eps), kl_coef=float(rl.kl_coef),
                                    aggregation=rl.aggregation, temperature=float(rl.temperature),
                                    remat=bool(config.train.remat))
        self.optimizer = grpo.make_optimizer(float(rl.lr), float(rl.weight_decay), float(rl.grad_clip),
                                             int(rl.warmup_steps))
        self.opt_shards = shd.opt_state_shardings(jax.eval_shape(self.optimizer.init, self.params), self.params,
                                                  self.param_shards, self.mesh)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shards)(self.params)
        self._compiled: Dict[Any, Any] = {}
        self.reward_fn = load_reward_fn(rl.reward, float(rl.format_weight))
        self.sspec, self.drafter = self._speculation(model)
        self.engine = self.spot = self.buffer = None
        self.drafter_warm = self.drafter is not None
        if config.tlt.enable and config.tlt.adaptive:
            self._build_engine(model, pool)
        self.step = 0
        if resume and existing is not None:
            self._restore()
        elif self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=1))
        if self.is_main:
            self._truncate_logs()

    # ------------------------------------------------------------------------------------------ setup

    def _place_policy(self, params) -> None:
        """The training mesh (``mesh.*``, over every process's devices) and the policy (and frozen reference) laid
        out on it FSDP-style, with tensor parallelism where the mesh has a tensor axis."""
        from tlt_jax.parallel.mesh import make_mesh

        self.mesh = make_mesh(self.config.mesh, self.devices)
        self.param_shards = shd.tree_shardings(params, self.mesh)
        self.params = shd.tree_to_global(params, self.param_shards)
        self.ref_params = (shd.tree_to_global(params, self.param_shards) if float(self.config.rl.kl_coef) > 0
                           else None)
        self.is_main = jax.process_index() == 0  # the process that writes logs, metrics and plots

    def _logprob_fn(self, batch: int, num_answer: int):
        key = ("logprob", batch, num_answer)
        if key not in self._compiled:
            self._compiled[key] = grpo.sharded_logprob(self.mesh, self.graphdef, num_answer,
                                                       float(self.config.rl.temperature), self.param_shards,
                                                       grpo.batch_shardings(self.mesh, batch))
        return self._compiled[key]

    def _update_fn(self, batch: int):
        key = ("update", batch)
        if key not in self._compiled:
            self._compiled[key] = grpo.sharded_update(self.mesh, self.graphdef, self.optimizer, self.gcfg,
                                                      self.param_shards, self.opt_shards,
                                                      grpo.batch_shardings(self.mesh, batch))
        return self._compiled[key]

    def _encode_prompts(self) -> None:
        from tlt_jax.data.loader import with_instruction
        from tlt_jax.models.tokenizer import chat_prompt_ids

        c = self.config
        if not self.examples:
            raise DataError(f"data source {c.data.source!r} gave no examples")
        questions = [with_instruction(q, c.data.instruction) for q, _ in self.examples]
        ids = chat_prompt_ids(self.tokenizer, questions, c.job.system_prompt or None)
        limit = int(c.rollout.max_prompt_len)
        keep = [i for i, p in enumerate(ids) if len(p) <= limit]
        if not keep:
            raise DataError(f"every prompt is longer than rollout.max_prompt_len={limit} tokens")
        if len(keep) < len(ids):
            self.log(f"[tlt] skipping {len(ids) - len(keep)} of {len(ids)} prompts longer than "
                     f"rollout.max_prompt_len={limit}")
        self.prompt_ids = [ids[i] for i in keep]
        self.examples_text = [questions[i] for i in keep]
        self.golds = [self.examples[i].answer for i in keep]

    def _speculation(self, model):
        """(SpeculativeSpec, drafter) for TLT, or (None, None) for the baseline."""
        if not self.config.tlt.enable:
            self.log("[tlt] baseline: plain rollouts (tlt.enable=False)")
            return None, None
        from tlt_jax.drafter import speculation_from_config
        from tlt_jax.rollout.speculative import SpeculativeSpec
        from tlt_jax.rollout.tree import SpecStrategy

        try:
            sspec, drafter = speculation_from_config(self.config, model)
        except CheckpointError as e:
            reason = str(e).split(". ")[0]  # the first sentence: what is missing where
            t = self.config.tlt
            if t.adaptive and t.spot_training:
                from tlt_jax.models.drafter import Drafter

                self.log(f"[tlt] no warmed drafter ({reason}); a fresh one trains on idle replicas "
                         f"and the n-gram proposer drafts until it has had {int(t.warm_after)} updates")
                sp = self.config.speculative
                sspec = SpeculativeSpec(SpecStrategy.parse(sp.strategy), ngram_max=int(sp.ngram_max),
                                        ngram_min=int(sp.ngram_min))
                drafter = Drafter(self.model_cfg, nnx.Rngs(int(self.config.seed) + 17))
                self._fresh_drafter = True
                self.log("[tlt] TLT: speculative rollouts, the n-gram proposer until the drafter is warm")
                return sspec, drafter
            strategy = SpecStrategy.parse(self.config.speculative.strategy)
            if not strategy.is_chain:
                strategy = SpecStrategy(depth=strategy.depth)
            sp = self.config.speculative
            sspec, drafter = SpeculativeSpec(strategy, proposer="ngram", ngram_max=int(sp.ngram_max),
                                             ngram_min=int(sp.ngram_min)), None
            self.log(f"[tlt] no warmed drafter ({reason}); the n-gram proposer drafts")
        self.log(f"[tlt] TLT: speculative rollouts, {sspec.strategy.name} with the {sspec.proposer} proposer")
        return sspec, drafter

    # ------------------------------------------------------------------------------------------ data

    def prompt_indices(self, step: int) -> List[int]:
        """Prompt indices of an RL step: a seeded permutation per epoch, read in order."""
        n = len(self.prompt_ids)
        per = int(self.config.rl.prompts_per_step)
        out = []
        for i in range(step * per, (step + 1) * per):
            epoch, j = divmod(i, n)
            if self.config.data.shuffle:
                perm = np.random.default_rng([int(self.config.data.seed), epoch, 104729]).permutation(n)
                out.append(int(perm[j]))
            else:
                out.append(j)
        return out

    # ------------------------------------------------------------------------------------------ one step

    def _build_engine(self, model, pool) -> None:
        from tlt_jax.drafter.buffer import DrafterBuffer
        from tlt_jax.drafter.spot import SpotTrainer, constant_optimizer
        from tlt_jax.drafter.train import split_drafter
        from tlt_jax.engine import AdaptiveEngine, EngineConfig
        from tlt_jax.rollout.decode import default_cache_len

        c, t = self.config, self.config.tlt
        ecfg = EngineConfig.from_config(c)
        rows = int(c.rl.prompts_per_step) * int(c.rl.group_size)
        cache_len = int(c.rollout.cache_len) or default_cache_len(
            -(-int(c.rollout.max_prompt_len) // 8) * 8, int(c.rl.max_new_tokens))
        dgraphdef = nnx.split(self.drafter)[0] if self.drafter is not None else None
        self.engine = AdaptiveEngine(self.graphdef, self.spec, ecfg, batch_size=rows, cache_len=cache_len,
                                     dgraphdef=dgraphdef, pool=pool, devices=self.devices,
                                     prompt_multiple=int(c.rl.prompt_multiple))
        if self.drafter is not None and t.spot_training:
            self.buffer = DrafterBuffer(int(t.buffer_capacity), int(t.buffer_window), int(t.buffer_lag))
            tg, dparams, drest = split_drafter(self.drafter)
            self.spot = SpotTrainer(tg, dparams, drest, self.graphdef, self.buffer,
                                    constant_optimizer(float(t.spot_lr), float(t.spot_weight_decay)),
                                    rows=int(t.spot_rows), seq_len=int(t.spot_seq_len), seed=int(c.seed),
                                    noise=float(t.spot_noise), max_steps_per_rollout=int(t.spot_max_steps))
        self.drafter_warm = self.drafter is not None and not getattr(self, "_fresh_drafter", False)
        self.log(f"[tlt] adaptive engine: {ecfg.replicas} replicas of {rows // ecfg.replicas} rows, buckets "
                 f"{self.engine.buckets}, speculation at <= {ecfg.sd_threshold} rows, spot training "
                 f"{'on' if self.spot else 'off'}")

    def precompile(self) -> Dict[str, float]:
        """Compiles the adaptive engine's programs ahead of time (a no-op without the engine)."""
        if self.engine is None:
            return {}
        dstate = nnx.split(self.drafter)[1] if self.drafter is not None else None
        # the programs of the proposer that drafts now (a drafter that warms up later compiles its own on first use)
        stats = self.engine.precompile(self.params, dstate, phases=("eagle",) if self.drafter_warm else ("ngram",))
        self.log(f"[tlt] program pool: {stats['programs']} programs ({stats['compiles']} compiled in "
                 f"{stats['compile_s']:.1f}s, {stats['relocations']} relocated to other replicas in "
                 f"{stats['relocate_s']:.1f}s)")
        return stats

    def _sync_drafter(self) -> None:
        """The spot trainer's averaged parameters into the drafter module."""
        if self.spot is not None:
            from tlt_jax.drafter.train import split_drafter

            g, _, rest = split_drafter(self.drafter)
            self.drafter = nnx.merge(g, self.spot.params, rest)
            if not self.drafter_warm and self.spot.total_steps >= int(self.config.tlt.warm_after):
                self.drafter_warm = True
                self.log(f"[tlt] drafter warm after {self.spot.total_steps} online updates: it drafts from now on")

    def rollout(self, prompts: List[List[int]], seed: int):
        from tlt_jax.rollout import generate
        from tlt_jax.rollout.speculative import generate_speculative

        cache_len = int(self.config.rollout.cache_len) or None
        if self.engine is not None:
            dstate = nnx.split(self.drafter)[1] if self.drafter is not None else None
            if self.spot is not None:
                self.spot.rl_step = self.step
            out = self.engine.rollout(self.params, dstate, prompts, seed=seed, use_drafter=self.drafter_warm,
                                      spot=self.spot)
            self._sync_drafter()
            self.last_engine_stats = out.stats
            return out.result, out.accept_len
        if self.sspec is None:  # plain rollouts over the whole training mesh
            model = nnx.merge(self.graphdef, self.params)
            return generate(model, prompts, self.spec, seed=seed, cache_len=cache_len, mesh=self.mesh), None
        # the non-adaptive speculative rollout runs on one local device (every process runs the whole batch)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        one = NamedSharding(Mesh(np.asarray(jax.local_devices()[:1]), ("data",)), PartitionSpec())
        model = nnx.merge(self.graphdef, shd.to_mesh(self.params, one))
        out = generate_speculative(model, prompts, self.spec, self.sspec, self.drafter, seed=seed,
                                   cache_len=cache_len)
        return out.result, out.accept_len

    def build_batch(self, prompts: List[List[int]], answers: List[List[int]], advantages: np.ndarray):
        """Host arrays of the training layout (see :mod:`tlt_jax.rl.grpo`)."""
        mult = int(self.config.rl.prompt_multiple)
        p = max(len(x) for x in prompts)
        p = -(-p // mult) * mult
        n = int(self.config.rl.max_new_tokens)
        b = len(prompts)
        tokens = np.zeros((b, p + n), np.int32)
        valid = np.zeros((b, p + n), bool)
        amask = np.zeros((b, n), bool)
        for i, (pr, an) in enumerate(zip(prompts, answers)):
            tokens[i, p - len(pr):p] = pr
            valid[i, p - len(pr):p] = True
            an = list(an)[:n]
            tokens[i, p:p + len(an)] = an
            valid[i, p:p + len(an)] = True
            amask[i, :len(an)] = True
        return tokens, valid, amask, np.asarray(advantages, np.float32)

    def train_step(self) -> Dict[str, float]:
        rl = self.config.rl
        g = int(rl.group_size)
        step = self.step
        idx = self.prompt_indices(step)
        prompts = [self.prompt_ids[i] for i in idx for _ in range(g)]
        golds = [self.golds[i] for i in idx for _ in range(g)]
        seed = int(self.config.seed) * 1_000_003 + step

        t0 = time.perf_counter()
        res, accept_len = self.rollout(prompts, seed)
        t_rollout = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens]
        finished = [r == "stop" for r in res.finish_reasons]
        rew: RewardOutput = safe_rewards(self.reward_fn, texts, golds, finished)
        rewards = np.asarray(rew.rewards, np.float64).reshape(len(idx), g)
        adv = grpo.group_advantages(rewards, rl.advantage)
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        tokens, valid, amask, adv = self.build_batch(prompts, res.tokens, adv)
        n = amask.shape[1]
        rows = grpo.batch_shardings(self.mesh, len(prompts))
        logprob = self._logprob_fn(len(prompts), n)
        toks_g, valid_g = shd.to_global(tokens, rows.tokens), shd.to_global(valid, rows.valid)
        old_logp, _, hidden = logprob(self.params, toks_g, valid_g)
        old_logp = shd.to_host(old_logp)
        ref_logp = (shd.to_host(logprob(self.ref_params, toks_g, valid_g)[0]) if self.ref_params is not None
                    else np.zeros_like(old_logp))
        if self.buffer is not None:  # the drafter's training data: features of this step's answers
            self.buffer.add(step, tokens, shd.to_host(hidden), valid, answer_start=tokens.shape[1] - n)
        del hidden
        t_logprob = time.perf_counter() - t0

        t0 = time.perf_counter()
        m = int(rl.minibatches)
        size = len(prompts) // m
        order = np.random.default_rng([seed, 3]).permutation(len(prompts))
        update, mb = self._update_fn(size), grpo.batch_shardings(self.mesh, size)
        sums: Dict[str, float] = {}
        skipped = 0
        for k in range(m):
            sel = order[k * size:(k + 1) * size]
            host = (tokens[sel], valid[sel], amask[sel], adv[sel], old_logp[sel], ref_logp[sel])
            batch = grpo.TrainBatch(*(shd.to_global(x, s) for x, s in zip(host, mb)))
            self.params, self.opt_state, met = update(self.params, self.opt_state, batch)
            met = {k2: float(v) for k2, v in jax.device_get(met).items()}
            if met["skipped"]:
                skipped += 1
                warnings.warn(f"step {step}: non-finite loss or gradient in mini-batch {k} "
                              f"(loss {met['pg_loss']}, grad norm {met['grad_norm']}); update skipped",
                              RuntimeWarning, stacklevel=2)
                continue
            for k2, v in met.items():
                sums[k2] = sums.get(k2, 0.0) + v
        t_update = time.perf_counter() - t0
        done = m - skipped
        metrics = {k2: v / done for k2, v in sums.items() if k2 != "skipped"} if done else {}
        lengths = np.asarray(res.lengths)
        metrics.update(
            step=step + 1, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
            accuracy=float(np.mean(rew.correct)), format_rate=float(np.mean(rew.formatted)),
            reward_errors=int(rew.errors), truncated=float(np.mean([r == "length" for r in res.finish_reasons])),
            skipped_updates=skipped, time_rollout=t_rollout, time_reward=t_reward, time_logprob=t_logprob,
            time_update=t_update, rollout_tokens=int(lengths.sum()),
            tokens_per_s=float(lengths.sum() / max(t_rollout, 1e-9)), **percentiles(lengths))
        metrics["step_time"] = t_rollout + t_reward + t_logprob + t_update
        self.last_samples = [
            {"step": step + 1, "question": self.examples_text[i], "gold": self.golds[i], "answer": texts[k * g],
             "reward": rew.rewards[k * g], "finish": res.finish_reasons[k * g]} for k, i in enumerate(idx)]
        if accept_len is not None:
            metrics["accept_len"] = float(accept_len)
        if self.engine is not None:
            es = self.last_engine_stats
            metrics.update(idle_device_s=es["idle_device_s"], spot_steps=es["spot_steps"],
                           pool_programs=es["pool_programs"], pool_compiles=es["pool_compiles"],
                           pool_compile_s=es["pool_compile_s"], pool_relocations=es["pool_relocations"],
                           pool_relocate_s=es["pool_relocate_s"],
                           drafter_proposes=float(self.drafter_warm), chunks=es["chunks"])
            for k in ("drafter_loss", "drafter_top1", "drafter_total_steps"):
                if k in es:
                    metrics[k] = es[k]
            metrics["arm_chunks"] = es["arm_chunks"]
        self.step = step + 1
        return metrics

    # ------------------------------------------------------------------------------------------ state

    def state_items(self) -> Dict[str, Any]:
        """What a checkpoint holds. The policy and its optimizer state are saved as laid out on the training mesh
        (each process writes its shards); the drafter's, kept whole on every process, are saved replicated."""
        items = {"policy": _leaves(self.params), "opt": _leaves(self.opt_state)}
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if self.drafter is not None:
            items["drafter"] = _leaves(nnx.state(self.drafter, nnx.Param))
        if self.spot is not None:
            items["drafter_opt"] = _leaves(self.spot.opt_state)
        for k in ("drafter", "drafter_opt"):
            if k in items:
                items[k] = {n: shd.to_global(x, rep) for n, x in items[k].items()}
        return items

    def save(self) -> str:
        meta = {"format": FORMAT, "step": self.step, "data_pos": self.step * int(self.config.rl.prompts_per_step),
                "seed": int(self.config.seed), "config_name": self.config.name,
                "drafter": self.drafter is not None,
                "drafter_updates": self.spot.total_steps if self.spot is not None else 0,
                "drafter_warm": bool(self.drafter_warm)}
        return checkpoint.save(self.ckpt_dir, self.step, self.state_items(), meta,
                               max_to_keep=int(self.config.train.keep_checkpoints))

    def _restore(self) -> None:
        step, meta = checkpoint.read_metadata(self.ckpt_dir)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.ckpt_dir} step {step} is not a trainer checkpoint")
        if bool(meta.get("drafter")) != (self.drafter is not None):
            raise CheckpointError(f"checkpoint step {step} was written {'with' if meta.get('drafter') else 'without'}"
                                  f" a learned drafter; this run has {'one' if self.drafter else 'none'}")
        want = {k: _abstract(flat) for k, flat in self.state_items().items()}
        step, items, meta = checkpoint.restore(self.ckpt_dir, want, step)
        self.params = _unleaves(self.params, items["policy"])
        self.opt_state = _unleaves(self.opt_state, items["opt"])
        local = lambda flat: {n: jnp.asarray(shd.to_host(x)) for n, x in flat.items()}  # noqa: E731
        if self.drafter is not None:
            state = _unleaves(nnx.state(self.drafter, nnx.Param), local(items["drafter"]))
            nnx.update(self.drafter, state)
        if self.spot is not None:
            from tlt_jax.drafter.train import split_drafter

            self.spot.params = split_drafter(self.drafter)[1]
            self.spot.opt_state = _unleaves(self.spot.opt_state, local(items["drafter_opt"]))
            self.spot.total_steps = int(meta.get("drafter_updates", 0))
            self.drafter_warm = bool(meta.get("drafter_warm", self.drafter_warm))
        self.step = int(meta["step"])
        self.log(f"[tlt] resumed from {self.ckpt_dir}/{step} (RL step {self.step})")

    # ------------------------------------------------------------------------------------------ logging

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    @property
    def samples_path(self) -> str:
        return os.path.join(self.workdir, "samples.jsonl")

    def _truncate_logs(self) -> None:
        """Drops log lines of steps after the checkpoint (a killed run logs steps it never saved)."""
        for path in (self.metrics_path, self.samples_path):
            if not os.path.exists(path):
                continue
            with open(path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = []
            for ln in lines:
                try:
                    if json.loads(ln).get("step", 0) <= self.step:
                        keep.append(ln)
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
            with open(path, "w") as f:
                f.writelines(keep)

    def read_metrics(self) -> List[Dict[str, Any]]:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]

    # ------------------------------------------------------------------------------------------ loop

    def run(self, progress: bool = True, on_step: Optional[Callable[[Dict[str, Any]], None]] = None
            ) -> List[Dict[str, Any]]:
        """Trains to ``rl.steps`` (a tqdm bar with ETA unless ``progress`` is False; ``on_step`` sees each
        step's metrics); checkpoints every ``train.checkpoint_every`` steps and at the end; returns the
        run's metrics history (all steps in this work dir)."""
        from tqdm import tqdm

        total = int(self.config.rl.steps)
        every = int(self.config.train.checkpoint_every)
        writer = None
        if self.config.train.tensorboard and self.is_main:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(self.workdir, "tb"))
        bar = tqdm(total=total, initial=self.step, desc="GRPO", unit="step", dynamic_ncols=True,
                   disable=not (progress and self.is_main))
        try:
            while self.step < total:
                metrics = self.train_step()
                if self.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json_line(metrics))
                    with open(self.samples_path, "a") as f:
                        f.writelines(json_line(x) for x in self.last_samples)
                if writer is not None:
                    for k, v in metrics.items():
                        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                            writer.add_scalar(k, v, metrics["step"])
                    writer.flush()
                post = {"reward": f"{metrics['reward_mean']:.3f}", "acc": f"{metrics['accuracy']:.2f}",
                        "len_p90": f"{metrics['len_p90']:.0f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if "accept_len" in metrics:
                    post["accept"] = f"{metrics['accept_len']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
                if on_step is not None:
                    on_step(metrics)
                if self.step % every == 0 or self.step == total:
                    self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if jax.process_count() > 1:
            from tlt_jax.parallel.multihost import barrier

            barrier("tlt_train_done")  # process 0 has written the last metrics line
        history = self.read_metrics()
        if self.config.train.plots and history and self.is_main:
            from tlt_jax.rl.plots import write_plots

            write_plots(history, os.path.join(self.workdir, "plots"))
        return history

