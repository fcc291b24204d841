"""Offline drafter warm-up by self-distillation from the target.

    python -m tlt_jax.drafter.warmup --config configs/smollm2_135m.py [--out DIR] [--config.a.b=v ...]

1. The target answers generated task prompts (``drafter.warmup.num_prompts``, at the listed temperatures).
2. One forward over each (prompt + answer) gives the target's features (final hidden states).
3. The drafter (draft vocabulary = the most frequent answer tokens) is trained with the EAGLE loss on the
   response positions, with uniform noise on its input features and weight decay (the data is small).
4. Held-out acceptance: a greedy chain-4 speculative rollout on ``eval_prompts`` unseen prompts reports the
   acceptance length (tokens committed per target forward); the teacher-forced top-1 agreement is shown too.
5. The drafter is saved with orbax (its own weights only) to ``--out`` or ``drafter.checkpoint`` or
   ``<cache dir>/drafters/<config name>``. The generated data is kept next to it (``warmup_data.npz``) and
   reused by a rerun with the same settings, so an interrupted warm-up does not generate twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_drafter_dir(config) -> str:
    from tlt_jax.models.tokenizer import cache_root

    if config.drafter.checkpoint:
        return os.path.abspath(os.path.expanduser(config.drafter.checkpoint))
    return os.path.join(cache_root(), "drafters", config.name)


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_prompts(tokenizer, n: int, seed: int, system: Optional[str]) -> List[List[int]]:
    from tlt_jax.data.tasks import arithmetic_problems
    from tlt_jax.models.tokenizer import chat_prompt_ids

    return chat_prompt_ids(tokenizer, [p.question for p in arithmetic_problems(n, seed)], system)


def generate_answers(model, prompts, config, stop_tokens, temperatures, seed: int):
    """Target answers, in batches, split evenly over the temperatures. Returns a list of token lists."""
    from tlt_jax.rollout import RolloutSpec, SamplingParams, generate

    w = config.drafter.warmup
    answers, done_tokens, t0 = [], 0, time.perf_counter()
    total = len(prompts)
    for start in range(0, total, w.gen_batch):
        batch = prompts[start:start + w.gen_batch]
        temp = float(temperatures[(start // w.gen_batch) % len(temperatures)])
        spec = RolloutSpec(max_new_tokens=int(w.max_new_tokens), stop_tokens=tuple(stop_tokens),
                           sampling=SamplingParams(temperature=temp), chunk_steps=32)
        out = generate(model, batch, spec, seed=seed + start)
        answers.extend(out.tokens)
        done_tokens += int(out.lengths.sum())
        el = time.perf_counter() - t0
        _log(f"  answers {len(answers)}/{total} (T={temp:g})  {done_tokens} tokens  {el:.0f}s "
             f"({done_tokens / max(el, 1e-9):.0f} tok/s)")
    return answers


def pack(prompts, answers, seq_len: int, pad_id: int):
    """Right-padded (prompt + answer) rows cut to seq_len, with the response loss mask."""
    import numpy as np

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


def choose_draft_vocab(answers, size: int, vocab_size: int, always=()) -> "np.ndarray":
    """The ``size`` most frequent answer tokens (stop tokens always in), then the lowest unused ids."""
    import numpy as np

    if size <= 0 or size >= vocab_size:
        return None
    counts = np.zeros((vocab_size,), np.int64)
    for a in answers:
        np.add.at(counts, np.asarray(a, np.int64), 1)
    for t in always:
        counts[t] += 1 << 40
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:size]).astype(np.int32)


def main(argv=None) -> int:
    from tlt_jax.config import load_config, split_config_args

    argv = list(sys.argv[1:] if argv is None else argv)
    path, overrides, rest = split_config_args(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="drafter checkpoint directory (default: see above)")
    ap.add_argument("--fresh-data", action="store_true", help="regenerate the self-distillation data")
    args = ap.parse_args(rest)
    if path is None:
        ap.error("--config is required (e.g. --config configs/smollm2_135m.py)")
    config = load_config(path, overrides)
    return run_warmup(config, out=args.out or default_drafter_dir(config), fresh_data=args.fresh_data)


def run_warmup(config, out: str, fresh_data: bool = False) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from tlt_jax.drafter.io import save_drafter
    from tlt_jax.drafter.loss import target_features
    from tlt_jax.drafter.train import make_optimizer, split_drafter, train_step
    from tlt_jax.models.drafter import Drafter
    from tlt_jax.models.tokenizer import load_tokenizer, stop_token_ids
    from tlt_jax.models.weights import model_from_config
    from tlt_jax.rollout import RolloutSpec
    from tlt_jax.rollout.speculative import SpeculativeSpec, generate_speculative
    from tlt_jax.rollout.tree import SpecStrategy

    t_start = time.perf_counter()
    w = config.drafter.warmup
    _log(f"[warmup] config {config.name}; drafter -> {out}")
    _, model = model_from_config(config)
    if not config.model.checkpoint:
        raise SystemExit("drafter warm-up needs a real target (model.checkpoint) and its tokenizer")
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.checkpoint)
    stops = stop_token_ids(tokenizer, config.rollout.stop_strings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    system = config.job.system_prompt or None
    prompts = build_prompts(tokenizer, int(w.num_prompts), int(w.data_seed), system)
    eval_prompts = build_prompts(tokenizer, int(w.eval_prompts), int(w.data_seed) + 1000, system)
    os.makedirs(out, exist_ok=True)

    # 1. self-distillation data (reused when the settings match)
    key = hashlib.sha256(json.dumps([config.name, config.model.checkpoint, w.num_prompts, w.max_new_tokens,
                                     list(w.temperatures), w.data_seed, system]).encode()).hexdigest()[:16]
    data_path = os.path.join(out, "warmup_data.npz")
    answers = None
    if os.path.exists(data_path) and not fresh_data:
        d = np.load(data_path, allow_pickle=False)
        if str(d["key"]) == key:
            flat, lens = d["answers"], d["lengths"]
            answers = np.split(flat, np.cumsum(lens)[:-1])
            answers = [a.tolist() for a in answers]
            _log(f"[warmup] reusing {len(answers)} answers from {data_path}")
    if answers is None:
        _log(f"[warmup] 1/4 target answers {len(prompts)} prompts (max {w.max_new_tokens} new tokens)")
        answers = generate_answers(model, prompts, config, stops, w.temperatures, int(config.seed))
        lens = np.asarray([len(a) for a in answers], np.int64)
        tmp = data_path + ".tmp.npz"
        np.savez(tmp, key=np.asarray(key), answers=np.concatenate([np.asarray(a, np.int32) for a in answers]),
                 lengths=lens)
        os.replace(tmp, data_path)
    n_resp = sum(len(a) for a in answers)
    _log(f"[warmup] {n_resp} response tokens, mean answer {n_resp / len(answers):.0f} tokens")

    # 2. target features
    seq_len = int(w.seq_len)
    tokens, valid, loss_mask = pack(prompts, answers, seq_len, pad)
    graphdef, tparams = nnx.split(model)

    @jax.jit
    def feats_fn(p, t, v):
        return target_features(nnx.merge(graphdef, p), t, v)

    t0 = time.perf_counter()
    fb = 8
    feats = []
    for s in range(0, len(tokens), fb):
        feats.append(np.asarray(feats_fn(tparams, tokens[s:s + fb], valid[s:s + fb])))
        _log(f"  features {min(s + fb, len(tokens))}/{len(tokens)}  {time.perf_counter() - t0:.0f}s")
    feats = np.concatenate(feats, 0)

    # 3. train
    vocab = choose_draft_vocab(answers, int(config.drafter.draft_vocab), model.cfg.vocab_size, stops)
    drafter = Drafter(model.cfg, nnx.Rngs(int(config.seed)), draft_vocab=vocab)
    dgraphdef, dparams, drest = split_drafter(drafter)
    steps = int(w.steps)
    opt = make_optimizer(float(w.lr), steps, weight_decay=float(w.weight_decay))
    opt_state = opt.init(dparams)
    rng = np.random.default_rng(int(config.seed))
    bs = min(int(w.batch_size), len(tokens))
    _log(f"[warmup] 3/4 training {steps} steps, batch {bs} x {seq_len} tokens, draft vocabulary "
         f"{'all' if vocab is None else len(vocab)}")
    t0 = time.perf_counter()
    order, pos, hist = rng.permutation(len(tokens)), 0, []
    step = 0
    for step in range(1, steps + 1):
        if pos + bs > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = np.sort(order[pos:pos + bs])
        pos += bs
        dparams, opt_state, m = train_step(dparams, drest, opt_state, tparams, tokens[idx], feats[idx],
                                           loss_mask[idx], jax.random.PRNGKey(step), dgraphdef=dgraphdef,
                                           tgraphdef=graphdef, optimizer=opt, noise=float(w.feature_noise))
        if step % 20 == 0 or step == steps:
            m = {k: float(v) for k, v in m.items()}
            hist.append(m)
            el = time.perf_counter() - t0
            _log(f"  step {step}/{steps}  loss {m['loss']:.4f}  reg {m['reg']:.4f}  ce {m['ce']:.3f}  "
                 f"top1 {m['top1']:.3f}  {el:.0f}s")
            if time.perf_counter() - t_start > float(w.time_budget_s):
                _log(f"[warmup] time budget of {w.time_budget_s:.0f}s reached: stopping after step {step}")
                break
    drafter = nnx.merge(dgraphdef, dparams, drest)

    # 4. held-out acceptance
    _log(f"[warmup] 4/4 held-out acceptance on {len(eval_prompts)} unseen prompts (greedy, chain-4)")
    spec = RolloutSpec(max_new_tokens=int(w.max_new_tokens), stop_tokens=tuple(stops), chunk_steps=16)
    res = generate_speculative(model, eval_prompts, spec, SpeculativeSpec(SpecStrategy(depth=4)), drafter)
    accept = res.accept_len
    _log(f"  acceptance length {accept:.2f} tokens per target forward ({int(res.result.lengths.sum())} tokens)")
    extra = {"accept_len_chain4_greedy": accept, "steps": step, "train_top1": hist[-1]["top1"] if hist else None,
             "response_tokens": n_resp, "seconds": time.perf_counter() - t_start}
    path = save_drafter(out, drafter, model, step=step, extra=extra, replace=True)
    _log(f"[warmup] saved drafter to {path} ({time.perf_counter() - t_start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
