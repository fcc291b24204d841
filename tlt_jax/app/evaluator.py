"""Held-out evaluation of a run's policy, during training (``eval.every``) and of a checkpoint (``tlt-eval``).

The evaluation's rollouts are built by ``app.build.rollout``, the function that builds the training rollout, at
the evaluation's temperature and at temperature 0: the adaptive engine (with the run's drafter, which proposes
once warm and never trains here) for TLT, plain decoding over the training mesh for the baseline. Speculation
is lossless, so both sample the same distribution and give the same scores in expectation; the baseline's
evaluation of a checkpoint reproduces the training run's evaluation of that step exactly (same problems, same
seeds, same parameters). Scoring and files: :mod:`tlt_jax.rl.evaluation`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import jax
from flax import nnx
from tqdm import tqdm

from tlt_jax.app import build, specs
from tlt_jax.core.errors import CheckpointError
from tlt_jax.drafter.online import OnlineDrafter
from tlt_jax.parallel import sharding as shd
from tlt_jax.rl import checkpoints
from tlt_jax.rl.evaluation import EvalResult, evaluate, read_summaries, write_result
from tlt_jax.rl.plots import write_eval_plot


class Evaluator:
    """The held-out problems of ``eval.*`` and the two rollouts that answer them (sampled and greedy)."""

    def __init__(self, config, *, graphdef, model_cfg, tokenizer, mesh, devices, speculation,
                 online: Optional[OnlineDrafter], pool=None, log: Callable[[str], None] = print):
        self.config, self.online, self.log = config, online, log
        self.settings = specs.eval_settings(config)
        self.prompts, self.questions, self.golds = build.task_prompts(config, tokenizer, specs.eval_source(config),
                                                                      log, what="eval")
        sampled_spec, greedy_spec = specs.eval_rollout_specs(config, build.stop_tokens(config, tokenizer))
        kw = dict(batch_size=self.settings.batch_size, speculation=speculation, online=online, mesh=mesh,
                  devices=devices, pool=pool)
        self.sampled = build.rollout(config, graphdef, model_cfg, sampled_spec, **kw)[0]
        self.greedy = build.rollout(config, graphdef, model_cfg, greedy_spec, **kw)[0] if self.settings.greedy else None
        self.reward_fn = build.reward_fn(config)
        self.decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
        log(f"[tlt] evaluation: {len(self.prompts)} held-out problems x {self.settings.samples} samples at "
            f"T={sampled_spec.sampling.temperature:g}{' + greedy' if self.greedy is not None else ''}, "
            f"pass@{list(self.settings.ks)}")

    def run(self, params, step: int, progress: bool = False) -> EvalResult:
        """Evaluates the policy ``params`` (the state after RL step ``step``)."""
        drafter = self.online.rollout_input(step, train=False) if self.online is not None else None
        total = len(self.prompts) * (self.settings.samples + int(self.greedy is not None))
        bar = tqdm(total=total, desc=f"eval step {step}", unit="answer", dynamic_ncols=True, leave=False,
                   disable=not progress)
        try:
            return evaluate(self.sampled, self.greedy, params, self.prompts, self.golds, self.questions,
                            settings=self.settings, reward_fn=self.reward_fn, decode=self.decode, drafter=drafter,
                            progress=bar.update)
        finally:
            bar.close()


def write_outputs(workdir: str, step: int, result: EvalResult) -> str:
    """The records and summary of step ``step`` (``rl.evaluation.write_result``) and ``plots/eval.png`` over
    every summary in ``workdir``; returns the records' path."""
    path = write_result(workdir, step, result)
    write_eval_plot(read_summaries(workdir), os.path.join(workdir, "plots"))
    return path


def evaluate_checkpoint(config, *, checkpoint: Optional[str] = None, step: Optional[int] = None,
                        workdir: Optional[str] = None, log: Callable[[str], None] = print,
                        progress: bool = True) -> Tuple[int, EvalResult, Optional[str]]:
    """``tlt-eval``: evaluates the policy of a run's checkpoint (``checkpoint``: the run's work dir, its
    ``checkpoints`` dir or one step's dir; ``step`` None: the newest), or the config's own model without one.
    Writes into ``workdir`` (default: the checkpoint's run dir; none without either). Returns (step, result,
    path of the records or None)."""
    model_cfg, model = build.model_from_config(config, None)
    tokenizer = build.tokenizer_from_config(config, "evaluation")
    graphdef, params = nnx.split(model)
    devices = list(jax.devices())
    mesh = specs.train_mesh(config, devices)  # the trainer's layout, which its checkpoints were written from
    run_dir, at = checkpoints.resolve(checkpoint, step) if checkpoint else (None, 0)
    if step is not None and not checkpoint:
        raise CheckpointError("--step needs --checkpoint")
    speculation, online = build.online_drafter(
        config, model, graphdef, model_cfg, log, train=False,
        warmup_dir=checkpoints.own_drafter_dir(run_dir) if run_dir else None)  # the run's own, if it warmed one
    params = shd.tree_to_global(params, shd.tree_shardings(params, mesh))
    if checkpoint:
        _, meta = checkpoints.read_meta(run_dir, at)
        checkpoints.check_matches(run_dir, at, "policy", params, meta, config.name)
        like = {"policy": params}
        if online is not None and meta.get("drafter"):
            like["drafter"] = nnx.state(online.drafter, nnx.Param)
            checkpoints.check_matches(run_dir, at, "drafter", like["drafter"], meta, config.name)
        elif meta.get("drafter"):
            log("[tlt] the checkpoint's drafter is not used: this config rolls out without one")
        trees = checkpoints.restore(run_dir, like, mesh, at)
        params = trees["policy"]
        if "drafter" in trees:
            online.restore(trees, meta)
        log(f"[tlt] policy of {checkpoints.checkpoint_dir(run_dir)}/{at} (RL step {meta['step']}, config "
            f"{meta.get('config_name')!r})")
    evaluator = Evaluator(config, graphdef=graphdef, model_cfg=model_cfg, tokenizer=tokenizer, mesh=mesh,
                          devices=devices, speculation=speculation, online=online, log=log)
    result = evaluator.run(params, at, progress=progress)
    out = workdir or run_dir
    path = None
    if out is not None and jax.process_index() == 0:
        path = write_outputs(os.path.abspath(os.path.expanduser(out)), at, result)
    return at, result, path
