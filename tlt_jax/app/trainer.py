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
                         rows ``{"step": N, "eval": {...}}`` hold the held-out evaluation of step N
                         (``eval.every``; ``read_metrics`` leaves them out, ``read_evals`` gives them)
    samples.jsonl        the first answer to each prompt of every step (question, gold, answer, reward)
    eval/<step>.jsonl    the evaluation's record per problem (its answers, their correctness, pass@k), and
    eval/<step>.summary.json  its summary (see ``rl.evaluation``)
    tb/                  TensorBoard events of the same metrics
    drafter/             the run's own warmed drafter, when it had none and warmed one first (tlt.warmup_at_start)
    checkpoints/<step>/  orbax checkpoints (the newest ``train.keep_checkpoints``)
    plots/*.png          reward, answer lengths and time split, written at the end; eval.png after each evaluation
    config.json          the config of the first run in this dir
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm import tqdm

from tlt_jax.app import build, specs
from tlt_jax.app.evaluator import Evaluator, write_outputs
from tlt_jax.core.errors import CheckpointError
from tlt_jax.core.jsonio import json_line, rounded
from tlt_jax.core.seeds import numpy_stream
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.multihost import barrier
from tlt_jax.rl import checkpoints, evaluation
from tlt_jax.rl.plots import write_plots
from tlt_jax.rl.step import RLStep


def step_line(metrics: Dict[str, Any]) -> str:
    """The per-step console line: ``[tlt] step N: `` and the step's metrics as strict JSON, floats rounded (every
    answer's length stays in metrics.jsonl; the line has their percentiles)."""
    return f"[tlt] step {metrics['step']}: " + json_line(rounded({k: v for k, v in metrics.items()
                                                                  if k not in ("step", "lengths")}))


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
        # all devices, or the first mesh.train_devices of each process (a CPU host split into devices for the
        # rollout replicas trains fastest on one of them: they share the process's cores)
        self.mesh = specs.train_mesh(config, self.devices)
        log(f"[tlt] model {self.model_cfg.architecture} {self.model_cfg.num_params() / 1e6:.1f}M params, "
            f"loaded in {time.perf_counter() - t0:.1f}s; training mesh {dict(self.mesh.shape)} on "
            f"{self.mesh.devices.size} of the {len(self.devices)} devices")
        self._load_prompts()
        self.spec = specs.rollout_spec(config, build.stop_tokens(config, self.tokenizer))
        self.speculation, self.online = build.online_drafter(config, model, self.graphdef, self.model_cfg, log,
                                                             tokenizer=self.tokenizer,
                                                             warmup_dir=checkpoints.own_drafter_dir(self.workdir))
        rollout = self._rollout(pool)
        self.rl = RLStep(self.graphdef, params, self.mesh, rollout=rollout, reward_fn=build.reward_fn(config),
                         grpo_config=specs.grpo_config(config), optimizer=specs.policy_optimizer(config),
                         decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
                         advantage=rl.advantage, minibatches=int(rl.minibatches),
                         prompt_multiple=int(rl.prompt_multiple), max_new_tokens=self.spec.max_new_tokens,
                         answer_buckets=int(rl.answer_buckets),
                         seed=int(config.seed), reference=float(rl.kl_coef) > 0, drafter=self.online)
        self.evaluator = None
        if int(config.eval.every) > 0 or config.eval.at_start:
            self.evaluator = Evaluator(config, graphdef=self.graphdef, model_cfg=self.model_cfg,
                                       tokenizer=self.tokenizer, mesh=self.mesh, devices=self.devices,
                                       speculation=self.speculation, online=self.online,
                                       pool=self.engine.pool if self.engine is not None else None, log=log)
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
        self.prompt_ids, self.examples_text, self.golds = build.task_prompts(
            self.config, self.tokenizer, specs.data_source(self.config), self.log)

    def _rollout(self, pool):
        """The run's rollout (``build.rollout``); logs what the adaptive engine is."""
        c = self.config
        rollout, self.engine = build.rollout(c, self.graphdef, self.model_cfg, self.spec,
                                             batch_size=specs.rows_per_step(c), speculation=self.speculation,
                                             online=self.online, mesh=self.mesh, devices=self.devices, pool=pool)
        if self.engine is None:
            return rollout
        engine_config = self.engine.config
        self.log(f"[tlt] adaptive engine: {engine_config.replicas} replicas of {self.engine.rows_per_replica} "
                 f"rows, buckets {self.engine.buckets}, speculation at <= {engine_config.sd_threshold} rows, spot "
                 f"training {'on' if self.spot else 'off'}")
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        replicas_here = engine_config.replicas * len(local) / max(1, len(self.devices))  # on this process's devices
        if local and local[0].platform == "cpu" and replicas_here > 1:
            self.log(f"[tlt] note: the {len(local)} CPU devices of this process share its cores (XLA's CPU "
                     f"runtime has one thread pool per process), so the replicas' chunks take turns and a "
                     f"finished replica's spot training takes time from the others; one process per replica "
                     f"(tlt-launch --processes {engine_config.replicas} --local-devices 1 --pin-cores) gives each "
                     f"replica cores of its own")
        return rollout

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
        return checkpoints.metrics_path(self.workdir)

    @property
    def samples_path(self) -> str:
        return os.path.join(self.workdir, "samples.jsonl")

    def _truncate_logs(self) -> None:
        """Drops log lines and evaluation files of steps after the checkpoint (a killed run logs steps it never
        saved)."""
        evaluation.drop_after(self.workdir, self.step)
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
        """The training rows of ``metrics.jsonl`` (one per RL step)."""
        return checkpoints.read_metrics(self.metrics_path)[0]

    def read_evals(self) -> List[Dict[str, Any]]:
        """The evaluation rows of ``metrics.jsonl``: ``{"step": N, "eval": summary}``."""
        return checkpoints.read_metrics(self.metrics_path)[1]

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, writer=None, progress: bool = False) -> Optional[Dict[str, Any]]:
        """The held-out evaluation of the current policy (step ``self.step``): records and summary in
        ``eval/``, a row in metrics.jsonl, TensorBoard scalars ``eval/*``, ``plots/eval.png``. A failure is a
        warning and returns None: training goes on, and nothing of the run is lost."""
        try:
            result = self.evaluator.run(self.params, self.step, progress=progress and self.is_main)
            if self.is_main:
                write_outputs(self.workdir, self.step, result)
        except Exception as e:  # noqa: BLE001 - an evaluation must never stop the training run
            msg = f"evaluation at step {self.step} failed ({type(e).__name__}: {e}); training continues"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self.log(f"[tlt] warning: {msg}")
            return None
        summary = result.summary
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json_line({"step": self.step, "eval": summary}))
            if writer is not None:
                for k, v in summary.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        writer.add_scalar(f"eval/{k}", v, self.step)
                writer.flush()
        self.log(f"[tlt] eval step {self.step}: " + json_line(rounded(summary)).rstrip("\n"))
        return summary

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
        eval_every = int(self.config.eval.every)
        try:
            if self.evaluator is not None and self.config.eval.at_start and self.step == 0:
                self.evaluate(writer, progress)
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
                if eval_every and self.evaluator is not None and (self.step % eval_every == 0 or self.step == total):
                    self.evaluate(writer, progress)  # before the checkpoint: a run killed here redoes it
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
