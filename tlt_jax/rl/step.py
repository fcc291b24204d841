"""One GRPO step as a unit a notebook can call: rollout -> rewards -> advantages -> log-prob forward -> updates.

    step = RLStep(graphdef, params, mesh, rollout=..., reward_fn=..., grpo_config=..., optimizer=..., decode=...)
    result = step.run(prompts, golds, group_size=4, index=0)     # result.metrics, result.texts, ...

The policy's parameters and optimizer state live on the training mesh (``mesh``; FSDP and tensor parallelism by
the sharding rules) and are updated in place of the old ones (donated). The rollout is any
:class:`~tlt_jax.rollout.host.Rollout` (plain, fixed speculation, the adaptive engine); with an
:class:`~tlt_jax.drafter.online.OnlineDrafter` the rollout gets the drafter and the actor forward's hidden states
become its training data.

Batch layout of the update: see :mod:`tlt_jax.rl.grpo`. Every row is padded to the prompt width (a multiple of
``prompt_multiple``) plus an answer width: the smallest of ``answer_buckets`` widths (``max_new_tokens``, half
of it, a quarter, ...; :func:`~tlt_jax.core.shapes.answer_widths`) that holds the longest answer, the batch's
for the log-prob forward and each mini-batch's own for its update (a long-tailed batch's few long answers make
one mini-batch wide, not all of them), so both pay for the tokens that exist, over a few compiled shapes.
Losses and gradients do not depend on the width (padding is masked and every mean is over answer tokens).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from tlt_jax.core.seeds import numpy_stream, stream_seed
from tlt_jax.core.shapes import answer_width, round_up
from tlt_jax.drafter.online import OnlineDrafter
from tlt_jax.parallel import sharding as shd
from tlt_jax.rl import grpo
from tlt_jax.rl.rewards import RewardOutput, safe_rewards
from tlt_jax.rollout.host import Rollout, RolloutOutput


class StepResult(NamedTuple):
    metrics: Dict[str, Any]  # one metrics.jsonl row
    rollout: RolloutOutput
    texts: List[str]  # decoded answers
    rewards: RewardOutput


def percentiles(lengths: Sequence[int]) -> Dict[str, float]:
    x = np.asarray(lengths, np.float64)
    return {"len_mean": float(x.mean()), "len_p50": float(np.percentile(x, 50)),
            "len_p75": float(np.percentile(x, 75)), "len_p90": float(np.percentile(x, 90)),
            "len_max": float(x.max())}


def build_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], advantages: np.ndarray, *,
                prompt_multiple: int, max_new_tokens: int, answer_buckets: int = 1):
    """Host arrays of the training layout (see :mod:`tlt_jax.rl.grpo`): tokens, valid, answer mask, advantages.

    Answers are cut at ``max_new_tokens``; the answer width is the smallest of ``answer_buckets`` widths that
    holds the longest (``answer_buckets = 1``: always ``max_new_tokens``)."""
    p = round_up(max(len(x) for x in prompts), prompt_multiple)
    n = answer_width(max(len(a) for a in answers), max_new_tokens, answer_buckets)
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


class RLStep:
    """The policy state on the training mesh and everything one RL step runs."""

    def __init__(self, graphdef, params, mesh: Mesh, *, rollout: Rollout, reward_fn: Callable,
                 grpo_config: grpo.GRPOConfig, optimizer: optax.GradientTransformation,
                 decode: Callable[[List[int]], str], advantage: str = "grpo", minibatches: int = 1,
                 prompt_multiple: int = 32, max_new_tokens: int = 128, answer_buckets: int = 1, seed: int = 0,
                 reference: bool = False, drafter: Optional[OnlineDrafter] = None):
        self.graphdef, self.mesh, self.rollout, self.reward_fn = graphdef, mesh, rollout, reward_fn
        self.grpo_config, self.optimizer, self.decode = grpo_config, optimizer, decode
        self.advantage, self.minibatches, self.prompt_multiple = advantage, int(minibatches), int(prompt_multiple)
        self.max_new_tokens, self.answer_buckets = int(max_new_tokens), int(answer_buckets)
        self.seed, self.drafter = int(seed), drafter
        self.param_shards = shd.tree_shardings(params, mesh)
        self.params = shd.tree_to_global(params, self.param_shards)
        self.ref_params = shd.tree_to_global(params, self.param_shards) if reference else None  # frozen for KL
        self.opt_shards = shd.opt_state_shardings(jax.eval_shape(optimizer.init, self.params), self.params,
                                                  self.param_shards, mesh)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self.opt_shards)(self.params)
        self._compiled: Dict[Any, Any] = {}

    # ------------------------------------------------------------------------------------------ programs

    def _logprob_fn(self, batch: int, num_answer: int):
        key = ("logprob", batch, num_answer)
        if key not in self._compiled:
            self._compiled[key] = grpo.sharded_logprob(self.mesh, self.graphdef, num_answer,
                                                       self.grpo_config.temperature, self.param_shards,
                                                       grpo.batch_shardings(self.mesh, batch))
        return self._compiled[key]

    def _update_fn(self, batch: int):
        key = ("update", batch)
        if key not in self._compiled:
            self._compiled[key] = grpo.sharded_update(self.mesh, self.graphdef, self.optimizer, self.grpo_config,
                                                      self.param_shards, self.opt_shards,
                                                      grpo.batch_shardings(self.mesh, batch))
        return self._compiled[key]

    # ------------------------------------------------------------------------------------------ one step

    def score(self, res: RolloutOutput, golds: List[str], group_size: int):
        """Rewards and advantages of a rollout's answers (each prompt's ``group_size`` answers in a row): (decoded
        texts, the reward function's output, rewards [num_prompts, group_size], advantages [rows])."""
        texts = [self.decode(t) for t in res.tokens]
        finished = [r == "stop" for r in res.finish_reasons]
        rew: RewardOutput = safe_rewards(self.reward_fn, texts, golds, finished)
        rewards = np.asarray(rew.rewards, np.float64).reshape(len(texts) // group_size, group_size)
        return texts, rew, rewards, grpo.group_advantages(rewards, self.advantage)

    def batch(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], advantages: np.ndarray):
        """:func:`build_batch` with this step's prompt multiple, cap and answer buckets."""
        return build_batch(prompts, answers, advantages, prompt_multiple=self.prompt_multiple,
                           max_new_tokens=self.max_new_tokens, answer_buckets=self.answer_buckets)

    def logprobs(self, tokens: np.ndarray, valid: np.ndarray, num_answer: int):
        """The log-prob forward of a batch in the training layout (host arrays): (the policy's answer log-probs
        [B, N], the frozen reference's (zeros without one), both on the host; the policy's final hidden states,
        on the devices)."""
        rows = grpo.batch_shardings(self.mesh, len(tokens))
        logprob = self._logprob_fn(len(tokens), num_answer)
        toks_g, valid_g = shd.to_global(tokens, rows.tokens), shd.to_global(valid, rows.valid)
        old_logp, _, hidden = logprob(self.params, toks_g, valid_g)
        old_logp = shd.to_host(old_logp)
        ref_logp = (shd.to_host(logprob(self.ref_params, toks_g, valid_g)[0]) if self.ref_params is not None
                    else np.zeros_like(old_logp))
        return old_logp, ref_logp, hidden

    def update(self, index: int, tokens, valid, amask, adv, old_logp, ref_logp, *, own_widths: bool = True):
        """The updates of step ``index`` on a batch in the training layout (host arrays, :func:`build_batch`), one
        per mini-batch (rows in a seeded random order). ``own_widths``: each mini-batch is cut to the answer width
        of its own longest answer (False: every one at the batch's width; the update benchmark's comparison).
        Returns (summed metrics of the applied updates, skipped updates, each mini-batch's answer width)."""
        m = self.minibatches
        size = len(tokens) // m
        n = amask.shape[1]
        order = numpy_stream(self.seed, "minibatch_order", index).permutation(len(tokens))
        update, mb = self._update_fn(size), grpo.batch_shardings(self.mesh, size)
        sums: Dict[str, float] = {}
        skipped = 0
        widths = []
        for k in range(m):
            sel = order[k * size:(k + 1) * size]
            # the mini-batch's own answer width: only the one that holds the longest answer pays for it
            w = answer_width(int(amask[sel].sum(1).max()), self.max_new_tokens, self.answer_buckets) \
                if own_widths else n
            widths.append(w)
            cut = tokens.shape[1] - n + w
            host = (tokens[sel, :cut], valid[sel, :cut], amask[sel, :w], adv[sel], old_logp[sel, :w],
                    ref_logp[sel, :w])
            batch = grpo.TrainBatch(*(shd.to_global(x, s) for x, s in zip(host, mb)))
            self.params, self.opt_state, met = update(self.params, self.opt_state, batch)
            met = {k2: float(v) for k2, v in jax.device_get(met).items()}
            if met["skipped"]:
                skipped += 1
                warnings.warn(f"step {index}: non-finite loss or gradient in mini-batch {k} "
                              f"(loss {met['pg_loss']}, grad norm {met['grad_norm']}); update skipped",
                              RuntimeWarning, stacklevel=3)
                continue
            for k2, v in met.items():
                sums[k2] = sums.get(k2, 0.0) + v
        return sums, skipped, widths

    def generate(self, prompts: List[List[int]], seed: int, train_drafter: bool = True,
                 rl_step: int = 0) -> RolloutOutput:
        """The rollout of one step (the drafter, if any, proposes once warm and trains on idle replicas)."""
        drafter = self.drafter.rollout_input(rl_step, train_drafter) if self.drafter is not None else None
        out = self.rollout.generate(self.params, prompts, seed=seed, drafter=drafter)
        if self.drafter is not None:
            self.drafter.after_rollout()
        return out

    def run(self, prompts: List[List[int]], golds: List[str], *, group_size: int, index: int) -> StepResult:
        """RL step ``index`` on ``prompts`` (each repeated ``group_size`` times in a row) and their gold
        answers (one per row)."""
        g = int(group_size)
        seed = stream_seed(self.seed, "rollout", index)

        t0 = time.perf_counter()
        res = self.generate(prompts, seed, rl_step=index)
        t_rollout = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts, rew, rewards, adv = self.score(res, golds, g)
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        tokens, valid, amask, adv = self.batch(prompts, res.tokens, adv)
        n = amask.shape[1]
        old_logp, ref_logp, hidden = self.logprobs(tokens, valid, n)
        if self.drafter is not None and self.drafter.buffer is not None:
            self.drafter.add_features(index, tokens, shd.to_host(hidden), valid, answer_start=tokens.shape[1] - n)
        del hidden
        t_logprob = time.perf_counter() - t0

        t0 = time.perf_counter()
        sums, skipped, widths = self.update(index, tokens, valid, amask, adv, old_logp, ref_logp)
        t_update = time.perf_counter() - t0
        done = self.minibatches - skipped
        metrics = {k2: v / done for k2, v in sums.items() if k2 != "skipped"} if done else {}
        lengths = np.asarray(res.lengths)
        metrics.update(
            step=index + 1, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
            accuracy=float(np.mean(rew.correct)), format_rate=float(np.mean(rew.formatted)),
            reward_errors=int(rew.errors), truncated=float(np.mean([r == "length" for r in res.finish_reasons])),
            skipped_updates=skipped, time_rollout=t_rollout, time_reward=t_reward, time_logprob=t_logprob,
            time_update=t_update, rollout_tokens=int(lengths.sum()),
            tokens_per_s=float(lengths.sum() / max(t_rollout, 1e-9)), **percentiles(lengths),
            update_widths=widths,  # each mini-batch's answer width
            lengths=[int(n) for n in lengths])  # every answer's length (Fig 1 of tlt-figures draws them)
        metrics["step_time"] = t_rollout + t_reward + t_logprob + t_update
        if res.accept_len is not None:
            metrics["accept_len"] = float(res.accept_len)
        es = res.stats
        if es:  # the adaptive engine's statistics
            metrics.update(idle_device_s=es["idle_device_s"], spot_steps=es["spot_steps"],
                           pool_programs=es["pool_programs"], pool_compiles=es["pool_compiles"],
                           pool_compile_s=es["pool_compile_s"], pool_relocations=es["pool_relocations"],
                           pool_relocate_s=es["pool_relocate_s"],
                           drafter_proposes=float(self.drafter is not None and self.drafter.warm),
                           chunks=es["chunks"])
            for k in ("drafter_loss", "drafter_top1", "drafter_total_steps"):
                if k in es:
                    metrics[k] = es[k]
            metrics["arm_chunks"] = es["arm_chunks"]
            # where speculation ran and what it gained: tokens/s per bucket:arm, share of chunk time speculating
            metrics["arm_tok_s"] = es["arm_tok_s"]
            metrics["spec_time_share"] = es["spec_time_share"]
        return StepResult(metrics, res, texts, rew)
