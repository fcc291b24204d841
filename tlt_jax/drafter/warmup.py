"""Offline drafter warm-up by self-distillation from the target (the command is ``tlt-warmup``).

1. The target answers generated task prompts (``num_prompts``, at the listed temperatures).
2. One forward over each (prompt + answer) gives the target's features (final hidden states).
3. The drafter (draft vocabulary = the most frequent answer tokens) is trained with the EAGLE loss on the
   response positions, with uniform noise on its input features and weight decay (the data is small).
4. Held-out: chain-4 speculative rollouts on ``eval_prompts`` unseen prompts report the acceptance length (tokens
   committed per target forward) at T = 0, 0.7 and 1 (the sampled rule when T > 0), and, teacher forced on the
   held-out answers sampled at T = 0.7 and 1, 1 - TV between the target's and the drafter's distributions at that
   temperature (the sampled rule's acceptance probability per drafted token, in the contexts a rollout at that
   temperature meets; on greedy answers it reads much higher than the acceptance shows).
5. The drafter is saved with orbax (its own weights only) to ``out``. The generated data is kept next to it
   (``warmup_data.npz``) and reused by a rerun with the same settings, so an interrupted warm-up does not
   generate twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.core.optim import make_optimizer
from tlt_jax.core.seeds import numpy_stream, stream_seed
from tlt_jax.data.tasks import arithmetic_problems
from tlt_jax.drafter.loss import distribution_overlap, target_features
from tlt_jax.drafter.train import split_drafter, train_step
from tlt_jax.io.drafter import save_drafter
from tlt_jax.io.tokenizer import chat_prompt_ids
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout.decode import RolloutSpec
from tlt_jax.rollout.host import generate
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeSpec
from tlt_jax.rollout.tree import SpecStrategy

DATA_VERSION = 2  # bumped when the prompt generator changes: cached answers of another version are not reused


class WarmupSpec(NamedTuple):
    """The warm-up's settings (``drafter.warmup.*``, ``drafter.draft_vocab``, ``seed``)."""

    num_prompts: int = 128  # task prompts answered by the target (self-distillation data)
    eval_prompts: int = 8  # held-out prompts for the acceptance estimate
    max_new_tokens: int = 192
    temperatures: Tuple[float, ...] = (0.0, 1.0)  # answers are generated at these temperatures, in equal shares
    gen_batch: int = 32
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    feature_noise: float = 0.2  # uniform noise in [-x, x] on the drafter's input features while training
    time_budget_s: float = 720.0  # training stops early (and says so) past this budget
    data_seed: int = 1
    draft_vocab: int = 8192  # ids the drafter proposes from (most frequent in its warm-up data); 0 = all
    seed: int = 0
    dist_temperature: float = 0.0  # the loss's distribution term at this temperature (the rollout's; 0: off)
    dist_weight: float = 0.0
    eval_temperatures: Tuple[float, ...] = (0.0, 0.7, 1.0)  # held-out acceptance at these; 1 - TV at the non-zero


def build_prompts(tokenizer, n: int, seed: int, system: Optional[str]) -> List[List[int]]:
    """Chat prompts of ``n`` generated arithmetic problems."""
    return chat_prompt_ids(tokenizer, [p.question for p in arithmetic_problems(n, seed)], system)


def eval_prompt_seed(data_seed: int) -> int:
    """The held-out prompts' seed (a stream of its own: never the training prompts)."""
    return stream_seed(data_seed, "warmup_eval_prompts")


def generate_answers(model: Decoder, prompts, spec: WarmupSpec, stop_tokens, log: Callable[[str], None]):
    """Target answers, in batches, split evenly over the temperatures. Returns a list of token lists."""
    answers, done_tokens, t0 = [], 0, time.perf_counter()
    total = len(prompts)
    for start in range(0, total, spec.gen_batch):
        batch = prompts[start:start + spec.gen_batch]
        temp = float(spec.temperatures[(start // spec.gen_batch) % len(spec.temperatures)])
        rollout = RolloutSpec(max_new_tokens=spec.max_new_tokens, stop_tokens=tuple(stop_tokens),
                              sampling=SamplingParams(temperature=temp), chunk_steps=32)
        out = generate(model, batch, rollout, seed=stream_seed(spec.seed, "warmup_answers", start))
        answers.extend(out.tokens)
        done_tokens += int(out.lengths.sum())
        el = time.perf_counter() - t0
        log(f"  answers {len(answers)}/{total} (T={temp:g})  {done_tokens} tokens  {el:.0f}s "
            f"({done_tokens / max(el, 1e-9):.0f} tok/s)")
    return answers


def pack(prompts, answers, seq_len: int, pad_id: int):
    """Right-padded (prompt + answer) rows cut to seq_len, with the response loss mask."""
    n = len(prompts)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    valid = np.zeros((n, seq_len), bool)
    loss_mask = np.zeros((n, seq_len), bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = (list(p) + list(a))[:seq_len]
        tokens[i, :len(seq)] = seq
        valid[i, :len(seq)] = True
        loss_mask[i, len(p):len(seq)] = True  # position t: the pair (f_{t-1}, x_t) with x_t a response token
    return tokens, valid, loss_mask


def choose_draft_vocab(answers, size: int, vocab_size: int, always=()) -> Optional[np.ndarray]:
    """The ``size`` most frequent answer tokens (stop tokens always in), then the lowest unused ids."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = np.zeros((vocab_size,), np.int64)
    for a in answers:
        np.add.at(counts, np.asarray(a, np.int64), 1)
    for t in always:
        counts[t] += 1 << 40
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:size]).astype(np.int32)


def _cached_answers(path: str, key: str) -> Optional[List[List[int]]]:
    if not os.path.exists(path):
        return None
    d = np.load(path, allow_pickle=False)
    if str(d["key"]) != key:
        return None
    return [a.tolist() for a in np.split(d["answers"], np.cumsum(d["lengths"])[:-1])]


def warm_up_drafter(model: Decoder, tokenizer, spec: WarmupSpec, *, out: str, stop_tokens: Sequence[int],
                    system: Optional[str], data_key: Sequence, fresh_data: bool = False,
                    log: Callable[[str], None] = print) -> Dict[str, object]:
    """Runs steps 1-5 above for the target ``model``; returns what was saved with the drafter (``extra``).

    ``data_key``: what identifies the target and its task (config name, checkpoint): cached answers are reused
    only when it and the data settings match.
    """
    t_start = time.perf_counter()
    stops = list(stop_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = build_prompts(tokenizer, spec.num_prompts, spec.data_seed, system)
    eval_prompts = build_prompts(tokenizer, spec.eval_prompts, eval_prompt_seed(spec.data_seed), system)
    os.makedirs(out, exist_ok=True)

    # 1. self-distillation data (reused when the settings match)
    key = hashlib.sha256(json.dumps(list(data_key) + [spec.num_prompts, spec.max_new_tokens,
                                                      list(spec.temperatures), spec.data_seed, system,
                                                      DATA_VERSION]).encode()).hexdigest()[:16]
    data_path = os.path.join(out, "warmup_data.npz")
    answers = None if fresh_data else _cached_answers(data_path, key)
    if answers is not None:
        log(f"[warmup] reusing {len(answers)} answers from {data_path}")
    else:
        log(f"[warmup] 1/4 target answers {len(prompts)} prompts (max {spec.max_new_tokens} new tokens)")
        answers = generate_answers(model, prompts, spec, stops, log)
        tmp = data_path + ".tmp.npz"
        np.savez(tmp, key=np.asarray(key), answers=np.concatenate([np.asarray(a, np.int32) for a in answers]),
                 lengths=np.asarray([len(a) for a in answers], np.int64))
        os.replace(tmp, data_path)
    n_resp = sum(len(a) for a in answers)
    log(f"[warmup] {n_resp} response tokens, mean answer {n_resp / len(answers):.0f} tokens")

    # 2. target features
    tokens, valid, loss_mask = pack(prompts, answers, spec.seq_len, pad)
    graphdef, target_params = nnx.split(model)

    @jax.jit
    def feats_fn(p, t, v):
        return target_features(nnx.merge(graphdef, p), t, v)

    t0 = time.perf_counter()
    fb = 8
    feats = []
    for s in range(0, len(tokens), fb):
        feats.append(np.asarray(feats_fn(target_params, tokens[s:s + fb], valid[s:s + fb])))
        log(f"  features {min(s + fb, len(tokens))}/{len(tokens)}  {time.perf_counter() - t0:.0f}s")
    feats = np.concatenate(feats, 0)

    # 3. train
    vocab = choose_draft_vocab(answers, spec.draft_vocab, model.cfg.vocab_size, stops)
    drafter = Drafter(model.cfg, nnx.Rngs(stream_seed(spec.seed, "drafter_init")), draft_vocab=vocab)
    drafter_graphdef, drafter_params, drafter_frozen = split_drafter(drafter)
    opt = make_optimizer(spec.lr, weight_decay=spec.weight_decay, warmup_steps=20, cosine_steps=spec.steps)
    opt_state = opt.init(drafter_params)
    rng = numpy_stream(spec.seed, "warmup_batches")
    bs = min(spec.batch_size, len(tokens))
    log(f"[warmup] 3/4 training {spec.steps} steps, batch {bs} x {spec.seq_len} tokens, draft vocabulary "
        f"{'all' if vocab is None else len(vocab)}")
    t0 = time.perf_counter()
    order, pos, hist = rng.permutation(len(tokens)), 0, []
    step = 0
    for step in range(1, spec.steps + 1):
        if pos + bs > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = np.sort(order[pos:pos + bs])
        pos += bs
        drafter_params, opt_state, m = train_step(
            drafter_params, drafter_frozen, opt_state, target_params, tokens[idx], feats[idx], loss_mask[idx],
            jax.random.PRNGKey(stream_seed(spec.seed, "warmup_noise", step)), drafter_graphdef=drafter_graphdef,
            target_graphdef=graphdef, optimizer=opt, noise=spec.feature_noise, temperature=spec.dist_temperature,
            dist_weight=spec.dist_weight)
        if step % 20 == 0 or step == spec.steps:
            m = {k: float(v) for k, v in m.items()}
            hist.append(m)
            el = time.perf_counter() - t0
            log(f"  step {step}/{spec.steps}  loss {m['loss']:.4f}  reg {m['reg']:.4f}  ce {m['ce']:.3f}  "
                f"top1 {m['top1']:.3f}  {el:.0f}s")
            if time.perf_counter() - t_start > spec.time_budget_s:
                log(f"[warmup] time budget of {spec.time_budget_s:.0f}s reached: stopping after step {step}")
                break
    drafter = nnx.merge(drafter_graphdef, drafter_params, drafter_frozen)

    # 4. held-out acceptance and distribution overlap
    log(f"[warmup] 4/4 held-out acceptance on {len(eval_prompts)} unseen prompts (chain-4)")
    extra = {"steps": step, "train_top1": hist[-1]["top1"] if hist else None, "response_tokens": n_resp}
    answers = {}
    for temp in spec.eval_temperatures:
        rollout = RolloutSpec(max_new_tokens=spec.max_new_tokens, stop_tokens=tuple(stops), chunk_steps=16,
                              sampling=SamplingParams(temperature=temp))
        speculation = SpeculativeSpec(SpecStrategy(depth=4), rule="sampled" if temp > 0 else "target_only")
        res = generate(model, eval_prompts, rollout, speculation=speculation, drafter=drafter,
                       seed=stream_seed(spec.seed, "warmup_eval", int(temp * 100)))
        answers[temp] = res.tokens
        extra[f"accept_len_chain4_t{temp:g}"] = res.accept_len
        log(f"  T={temp:g} ({speculation.rule}): acceptance length {res.accept_len:.2f} tokens per target forward "
            f"({int(res.lengths.sum())} tokens)")
    if 0.0 in spec.eval_temperatures:
        extra["accept_len_chain4_greedy"] = extra["accept_len_chain4_t0"]
    for temp in [t for t in spec.eval_temperatures if t > 0]:
        tokens, valid, loss_mask = pack(eval_prompts, answers[temp], spec.seq_len, pad)
        feats = feats_fn(target_params, tokens, valid)
        overlap = float(distribution_overlap(drafter, model, jnp.asarray(tokens), feats, jnp.asarray(loss_mask), temp))
        extra[f"one_minus_tv_t{temp:g}"] = overlap
        log(f"  T={temp:g}: held-out 1 - TV(target, drafter) = {overlap:.3f} (teacher forced, answers sampled at "
            f"T={temp:g})")
    extra["seconds"] = time.perf_counter() - t_start
    path = save_drafter(out, drafter, model, step=step, extra=extra, replace=True)
    log(f"[warmup] saved drafter to {path} ({time.perf_counter() - t_start:.0f}s in all)")
    return extra
