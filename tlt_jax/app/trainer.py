"""The GRPO job around the RL step: built from a config, it loops, checkpoints, logs, plots and resumes.

The step itself (rollout -> rewards -> advantages -> log-prob forward -> updates) is :class:`tlt_jax.rl.step.RLStep`;
this module wires it from the config (model, tokenizer, data, the rollout the ``tlt`` section asks for, the
drafter) and runs it. Everything a step needs is a function of (config, step, state), so a run resumed from a
checkpoint continues exactly: the prompts and every random stream of step ``s`` are derived from ``s``
(``core.seeds``); the checkpoint (layout: ``rl.checkpoints``) holds the policy, its optimizer state, the drafter
(when there is one), the step and the data position.

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
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm import tqdm

from tlt_jax.app import build, specs
from tlt_jax.core.errors import CheckpointError, ConfigError, DataError
from tlt_jax.core.jsonio import json_line
from tlt_jax.core.seeds import numpy_stream, stream_seed
from tlt_jax.data.loader import load_examples, with_instruction
from tlt_jax.drafter.online import OnlineDrafter
from tlt_jax.engine.adaptive import AdaptiveEngine
from tlt_jax.io.tokenizer import chat_prompt_ids
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.parallel.multihost import barrier
from tlt_jax.rl import checkpoints
from tlt_jax.rl.plots import write_plots
from tlt_jax.rl.rewards import math_rewards
from tlt_jax.rl.step import RLStep


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


def step_line(metrics: Dict[str, Any]) -> str:
    """The per-step console line: ``[tlt] step N: `` and the step's metrics as strict JSON, floats rounded."""
    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return round(v, 4) if isinstance(v, float) else v

    line = json_line({k: rounded(v) for k, v in metrics.items() if k != "step"})
    return f"[tlt] step {metrics['step']}: " + line


class Trainer:
    """Holds the run's state; :meth:`run` trains to ``rl.steps``."""

    def __init__(self, config, workdir: str, *, resume: bool = False, log: Callable[[str], None] = print,
                 pool=None, devices: Optional[Sequence[jax.Device]] = None):
        self.config = config
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.ckpt_dir = checkpoints.checkpoint_dir(self.workdir)
        self.log = log
        self.devices = list(jax.devices() if devices is None else devices)  # training mesh and rollout replicas
        self.is_main = jax.process_index() == 0  # the process that writes logs, metrics and plots
        rl = config.rl
        existing = checkpoints.latest_step(self.workdir)
        if existing is not None and not resume:
            raise CheckpointError(f"{self.workdir} already holds a run (checkpoint step {existing}); pass --resume "
                                  f"to continue it or choose another --workdir")
        if resume and existing is None:
            log(f"[tlt] --resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
        os.makedirs(self.workdir, exist_ok=True)

        t0 = time.perf_counter()
        self.model_cfg, model = build.model_from_config(config, None)
        self.tokenizer = build.tokenizer_from_config(config, "training")
        self.graphdef, params = nnx.split(model)
        self.mesh = make_mesh(specs.mesh_sizes(config), self.devices)
        log(f"[tlt] model {self.model_cfg.architecture} {self.model_cfg.num_params() / 1e6:.1f}M params, "
            f"loaded in {time.perf_counter() - t0:.1f}s")
        self._load_prompts()
        self.spec = specs.rollout_spec(config, build.stop_tokens(config, self.tokenizer))
        self.engine = None
        self.online = self._drafter(model)
        rollout = self._rollout(pool)
        self.rl = RLStep(self.graphdef, params, self.mesh, rollout=rollout,
                         reward_fn=load_reward_fn(rl.reward, float(rl.format_weight)),
                         grpo_config=specs.grpo_config(config), optimizer=specs.policy_optimizer(config),
                         decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
                         advantage=rl.advantage, minibatches=int(rl.minibatches),
                         prompt_multiple=int(rl.prompt_multiple), max_new_tokens=self.spec.max_new_tokens,
                         answer_buckets=int(rl.answer_buckets),
                         seed=int(config.seed), reference=float(rl.kl_coef) > 0, drafter=self.online)
        self.step = 0
        if resume and existing is not None:
            self._restore()
        elif self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=1))
        if self.is_main:
            self._truncate_logs()

    # ------------------------------------------------------------------------------------------ the policy

    @property
    def params(self):
        return self.rl.params

    @property
    def opt_state(self):
        return self.rl.opt_state

    @property
    def param_shards(self):
        return self.rl.param_shards

    @property
    def drafter(self) -> Optional[Drafter]:
        return self.online.drafter if self.online is not None else None

    @property
    def spot(self):
        return self.online.trainer if self.online is not None else None

    # ------------------------------------------------------------------------------------------ setup

    def _load_prompts(self) -> None:
        c = self.config
        d = c.data
        n_needed = int(c.rl.steps) * int(c.rl.prompts_per_step)
        limit = int(d.limit) if int(d.limit) > 0 else (n_needed if d.source == "arithmetic" else 0)
        examples = load_examples(d.source, subset=d.subset, split=d.split, question_field=d.question_field,
                                 answer_field=d.answer_field, answer_format=d.answer_format, limit=limit,
                                 seed=int(d.seed), mean_terms=float(d.mean_terms))
        if not examples:
            raise DataError(f"data source {d.source!r} gave no examples")
        questions = [with_instruction(q, d.instruction) for q, _ in examples]
        ids = chat_prompt_ids(self.tokenizer, questions, c.job.system_prompt or None,
                              enable_thinking=bool(c.data.enable_thinking))
        limit = int(c.rollout.max_prompt_len)
        keep = [i for i, p in enumerate(ids) if len(p) <= limit]
        if not keep:
            raise DataError(f"every prompt is longer than rollout.max_prompt_len={limit} tokens")
        if len(keep) < len(ids):
            self.log(f"[tlt] skipping {len(ids) - len(keep)} of {len(ids)} prompts longer than "
                     f"rollout.max_prompt_len={limit}")
        self.prompt_ids = [ids[i] for i in keep]
        self.examples_text = [questions[i] for i in keep]
        self.golds = [examples[i].answer for i in keep]

    def _drafter(self, model) -> Optional[OnlineDrafter]:
        """The drafter for TLT (None for the baseline or the n-gram proposer); sets ``self.speculation``."""
        c, t = self.config, self.config.tlt
        self.speculation = None
        if not t.enable:
            self.log("[tlt] baseline: plain rollouts (tlt.enable=False)")
            return None
        spot = specs.spot_spec(c) if (t.adaptive and t.spot_training) else None
        online = dict(target_graphdef=self.graphdef, spot=spot, optimizer=specs.spot_optimizer(c) if spot else None,
                      seed=int(c.seed), log=self.log)
        try:
            self.speculation, drafter = build.speculation_from_config(c, model)
        except CheckpointError as e:
            reason = str(e).split(". ")[0]  # the first sentence: what is missing where
            if spot is not None:
                self.log(f"[tlt] no warmed drafter ({reason}); a fresh one trains on idle replicas "
                         f"and the model-free arms (tlt.ngram_arms) draft until it has had {spot.warm_after} updates")
                self.speculation = specs.speculative_spec(c)
                self.log("[tlt] TLT: speculative rollouts, the model-free arms until the drafter is warm")
                fresh = Drafter(self.model_cfg, nnx.Rngs(stream_seed(int(c.seed), "drafter_init")))
                return OnlineDrafter(fresh, warm=False, **online)
            self.speculation, drafter = build.ngram_fallback(c), None
            self.log(f"[tlt] no warmed drafter ({reason}); the n-gram proposer drafts")
        self.log(f"[tlt] TLT: speculative rollouts, {self.speculation.strategy.name} with the "
                 f"{self.speculation.proposer} proposer")
        return OnlineDrafter(drafter, warm=True, **online) if drafter is not None else None

    def _rollout(self, pool):
        """The baseline's plain rollout over the training mesh; with TLT the adaptive engine over the replicas,
        or (``tlt.adaptive=False``) the fixed strategy on one local device (every process runs the whole
        batch)."""
        c = self.config
        if self.speculation is None:
            return build.fixed_rollout(c, self.graphdef, self.model_cfg, self.spec, mesh=self.mesh)
        if not c.tlt.adaptive:
            return build.fixed_rollout(c, self.graphdef, self.model_cfg, self.spec, speculation=self.speculation,
                                       drafter=self.drafter, mesh=build.one_device_mesh())
        engine_config = specs.engine_config(c)
        rows = specs.rows_per_step(c)
        self.engine = AdaptiveEngine(self.graphdef, self.spec, engine_config, batch_size=rows,
                                     cache_len=specs.fixed_cache_len(c),
                                     drafter_graphdef=self.online.graphdef if self.online is not None else None,
                                     pool=pool, devices=self.devices, prompt_multiple=int(c.rl.prompt_multiple))
        self.log(f"[tlt] adaptive engine: {engine_config.replicas} replicas of {rows // engine_config.replicas} "
                 f"rows, buckets {self.engine.buckets}, speculation at <= {engine_config.sd_threshold} rows, spot "
                 f"training {'on' if self.spot else 'off'}")
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        if engine_config.replicas > 1 and local and local[0].platform == "cpu":
            self.log(f"[tlt] note: the {len(local)} CPU devices of this process share its {os.cpu_count()} cores "
                     f"(XLA's CPU runtime has one thread pool per process), so the replicas' chunks take turns "
                     f"and a finished replica's spot training takes time from the others")
        return self.engine

    def precompile(self) -> Dict[str, float]:
        """Compiles the adaptive engine's programs ahead of time (a no-op without the engine)."""
        if self.engine is None:
            return {}
        dstate = nnx.split(self.drafter)[1] if self.drafter is not None else None
        # the programs of the proposer that drafts now (a drafter that warms up later compiles its own on first use)
        warm = self.online is not None and self.online.warm
        stats = self.engine.precompile(self.params, dstate, phases=("eagle",) if warm else ("ngram",))
        self.log(f"[tlt] program pool: {stats['programs']} programs ({stats['compiles']} compiled in "
                 f"{stats['compile_s']:.1f}s, {stats['relocations']} relocated to other replicas in "
                 f"{stats['relocate_s']:.1f}s)")
        return stats

    # ------------------------------------------------------------------------------------------ data

    def prompt_indices(self, step: int) -> List[int]:
        """Prompt indices of an RL step: a seeded permutation per epoch, read in order."""
        n = len(self.prompt_ids)
        per = int(self.config.rl.prompts_per_step)
        out = []
        for i in range(step * per, (step + 1) * per):
            epoch, j = divmod(i, n)
            if self.config.data.shuffle:
                out.append(int(numpy_stream(int(self.config.data.seed), "prompt_order", epoch).permutation(n)[j]))
            else:
                out.append(j)
        return out

    # ------------------------------------------------------------------------------------------ one step

    def rollout(self, prompts: List[List[int]], seed: int, train_drafter: bool = True):
        """A rollout with the current policy and drafter (``train_drafter`` False: no spot training)."""
        return self.rl.generate(prompts, seed, train_drafter=train_drafter, rl_step=self.step)

    def train_step(self) -> Dict[str, float]:
        g = int(self.config.rl.group_size)
        idx = self.prompt_indices(self.step)
        prompts = [self.prompt_ids[i] for i in idx for _ in range(g)]
        golds = [self.golds[i] for i in idx for _ in range(g)]
        result = self.rl.run(prompts, golds, group_size=g, index=self.step)
        self.last_samples = [
            {"step": self.step + 1, "question": self.examples_text[i], "gold": self.golds[i],
             "answer": result.texts[k * g], "reward": result.rewards.rewards[k * g],
             "finish": result.rollout.finish_reasons[k * g]} for k, i in enumerate(idx)]
        self.step += 1
        return result.metrics

    # ------------------------------------------------------------------------------------------ state

    def _trees(self) -> Dict[str, Any]:
        trees = {"policy": self.params, "opt": self.opt_state}
        if self.online is not None:
            trees.update(self.online.state())
        return trees

    def save(self) -> str:
        meta = {"data_pos": self.step * int(self.config.rl.prompts_per_step), "seed": int(self.config.seed),
                "config_name": self.config.name, "drafter": self.drafter is not None,
                **(self.online.counters() if self.online is not None else
                   {"drafter_updates": 0, "drafter_warm": False})}
        return checkpoints.save(self.workdir, self.step, self._trees(), meta, self.mesh,
                                keep=int(self.config.train.keep_checkpoints))

    def _restore(self) -> None:
        step, meta = checkpoints.read_meta(self.workdir)
        if bool(meta.get("drafter")) != (self.drafter is not None):
            raise CheckpointError(f"checkpoint step {step} was written {'with' if meta.get('drafter') else 'without'}"
                                  f" a learned drafter; this run has {'one' if self.drafter else 'none'}")
        trees = checkpoints.restore(self.workdir, self._trees(), self.mesh, step)
        self.rl.params, self.rl.opt_state = trees["policy"], trees["opt"]
        if self.online is not None:
            self.online.restore(trees, meta)
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
        total = int(self.config.rl.steps)
        every = int(self.config.train.checkpoint_every)
        writer = None
        if self.config.train.tensorboard and self.is_main:
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
            barrier("tlt_train_done")  # process 0 has written the last metrics line
        history = self.read_metrics()
        if self.config.train.plots and history and self.is_main:
            write_plots(history, os.path.join(self.workdir, "plots"))
        return history
