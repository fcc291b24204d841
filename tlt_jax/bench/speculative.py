"""Speculative rollout throughput against plain decoding, measured side by side in one run.

    python -m tlt_jax.bench.speculative [--json PATH] [--batches 1,4,16,32] [--temperatures 0,0.7,1]
        [--rules target_only,sampled]
        [--strategies chain-2,chain-4,chain-8,4_2_8,6_4_16,8_4_32,ngram:chain-4] [--new-tokens 128] [--drafter DIR]
        [--min-rows 4] [--verify-sizes auto]
        [--groups 4,8] [--group-prompts 2] [--group-temperature 0.7]
        [--group-strategies ngram:chain-4,group:chain-4,chain-4@sampled,hybrid:chain-4@sampled]
        [--config configs/smollm2_135m.py] [--config.a.b=v ...]

Target: the config's, by default SmolLM2-135M-Instruct (embedded GGUF, float32), with the drafter saved by
``tlt-warmup --config <config>`` (``--drafter``, ``drafter.checkpoint`` or the default directory). Prompts: held-out
task prompts (the same generator as the warm-up, another seed). Every row stops at its EOS or after
``--new-tokens`` tokens. For each (batch, temperature) the plain rollout and every strategy run the same prompts
with the same seed; each is run twice and the second, fully compiled, run is timed.
A batch smaller than ``--min-rows`` (default 4) runs that many rows as disjoint groups one after the other (batch
1: four prompts, one at a time), so a single short answer does not decide a cell.

Per row of the table: ``accept_len`` = tokens committed per target forward (verify step), ``tok_s`` = answer
tokens per second of wall time (prefill included), ``plain_tok_s`` the plain rollout's, ``speedup`` their ratio.
A strategy is an arm name: prefixed ``ngram:`` or ``group:`` it uses a model-free proposer instead of the drafter,
``hybrid:`` the hybrid. Every learned-drafter strategy without an ``@rule`` runs with each of ``--rules``
(``target_only``: deterministic drafts; ``sampled``: drafts drawn from the drafter's distribution, verified by
speculative / recursive rejection sampling); ``verify_cost`` in a row is a
verify of its V tokens in decode steps.

The group table (``--groups``; '' skips it): GRPO groups, ``--group-prompts`` prompts each answered G times in
one batch at ``--group-temperature``, twice (``epoch`` 1 and 2, other seeds), as the same prompts come back in RL:
in epoch 2 the group proposer also drafts from epoch 1's answers (``speculative.group_store``, 4 per prompt).
Every strategy (an arm name: ``ngram:``, ``group:``, ``hybrid:`` prefixes, ``@sampled``) against plain decoding
of the same batch and seed; each strategy's programs are compiled by an untimed run with a store of its own.

Last, one verify forward of V tokens is timed against one decode step at batch 1 (``verify_cost`` in the
JSON; ``--verify-sizes auto``: V = 1 and each strategy's verified tokens, ``verify_tokens`` in its rows): at
batch 1 a speculative step costs one verify forward plus the drafting, so the speedup is roughly bounded by
accept_len x decode_ms / verify_ms (roughly: a verify timed alone is noisier than one inside a chunk).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.app import build, specs
from tlt_jax.app.config import load_config
from tlt_jax.bench.common import config_overrides, machine_info, print_table, write_json
from tlt_jax.core.errors import CheckpointError
from tlt_jax.core.seeds import stream_seed
from tlt_jax.core.shapes import round_up
from tlt_jax.drafter.warmup import build_prompts
from tlt_jax.io.drafter import load_drafter
from tlt_jax.models.decoder import causal_mask, decode, prefill, verify
from tlt_jax.models.kv_cache import init_cache
from tlt_jax.rollout.acceptance import RULES
from tlt_jax.rollout.decode import RolloutSpec
from tlt_jax.rollout.host import generate
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.suffix import GroupStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--temperatures", default="0,0.7,1")
    ap.add_argument("--rules", default="target_only,sampled",
                    help="acceptance rules of the learned-drafter strategies (the n-gram proposer: target_only)")
    ap.add_argument("--strategies", default="chain-2,chain-4,chain-8,4_2_8,6_4_16,8_4_32,ngram:chain-4")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--drafter", default="", help="drafter checkpoint directory (default: the warm-up's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-rows", type=int, default=4,
                    help="a batch smaller than this runs several disjoint prompt groups, timed together")
    ap.add_argument("--groups", default="4,8", help="group sizes G of the group table ('' skips it)")
    ap.add_argument("--group-prompts", type=int, default=2, help="prompts per batch of the group table")
    ap.add_argument("--group-temperature", type=float, default=0.7)
    ap.add_argument("--group-strategies", default="ngram:chain-4,group:chain-4,chain-4@sampled,hybrid:chain-4@sampled")
    ap.add_argument("--verify-sizes", default="auto",
                    help="also time one verify forward of V tokens against one decode step (batch 1): a list, "
                         "'auto' (1 and every strategy's V) or '' (skip)")
    ap.add_argument("--config", default="configs/smollm2_135m.py",
                    help="the target, tokenizer and task (--config.a.b=v overrides it)")
    args, rest = ap.parse_known_args(argv)
    config = load_config(args.config, config_overrides(ap, rest))
    _, model = build.model_from_config(config)
    tokenizer = build.tokenizer_from_config(config, "the benchmark")
    stops = build.stop_tokens(config, tokenizer)
    rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in rules if r not in RULES]
    if unknown or not rules:
        ap.error(f"--rules: choose from {list(RULES)}, got {args.rules!r}")
    base = specs.speculative_spec(config)
    strategies = []
    for s in args.strategies.split(","):
        sp = base.with_arm(s)
        for rule in (rules if sp.learned and "@" not in s else [sp.rule]):
            strategies.append((s, dataclasses.replace(sp, rule=rule)))
    group_sizes = [int(g) for g in args.groups.split(",") if g]
    group_strategies = [(a, base.with_arm(a)) for a in args.group_strategies.split(",") if a] if group_sizes else []
    drafter, meta = None, {}
    if any(sp.learned for _, sp in strategies + group_strategies):
        ddir = args.drafter or build.default_drafter_dir(config)
        try:
            drafter, meta = load_drafter(ddir, model)
        except (CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"no usable drafter at {ddir} ({e}); run "
                             f"`tlt-warmup --config {args.config}` first")
        print(f"drafter from {ddir} (warm-up acceptance {meta.get('extra', {}).get('accept_len_chain4_greedy')})",
              flush=True)
    w = config.drafter.warmup
    batches = [int(b) for b in args.batches.split(",") if b]  # '' skips the main table
    all_prompts = build_prompts(tokenizer, max(batches + [args.min_rows, args.group_prompts]),
                                stream_seed(int(w.data_seed), "bench_prompts"), config.job.system_prompt or None)

    rows = []
    for temp in [float(t) for t in args.temperatures.split(",")]:
        spec = RolloutSpec(max_new_tokens=args.new_tokens, stop_tokens=stops, chunk_steps=16,
                           sampling=SamplingParams(temperature=temp))
        for b in batches:
            groups = [all_prompts[i * b:(i + 1) * b] for i in range(max(1, round_up(args.min_rows, b) // b))]

            def timed(fn):
                """Runs every group (the first run of each also compiles, untimed); returns (outputs, seconds)."""
                outs, sec = [], 0.0
                for g in groups:
                    fn(g)
                    t0 = time.perf_counter()
                    outs.append(fn(g))
                    sec += time.perf_counter() - t0
                return outs, sec

            plain, plain_s = timed(lambda g: generate(model, g, spec, seed=args.seed))
            plain_tok = sum(int(p.lengths.sum()) for p in plain)
            plain_tok_s = plain_tok / plain_s
            print(f"T={temp:g} batch {b} ({len(groups)} group(s)): plain {plain_tok} tokens, {plain_tok_s:.1f} tok/s",
                  flush=True)
            for label, speculation in strategies:
                outs, sec = timed(lambda g: generate(model, g, spec, speculation=speculation, drafter=drafter,
                                                     seed=args.seed))
                ntok = sum(int(o.lengths.sum()) for o in outs)
                committed = sum(int(o.lengths.sum()) - len(o.lengths) for o in outs)
                forwards = sum(int(o.verifies.sum()) for o in outs)
                same = None
                if temp == 0.0:  # lossless: greedy answers must be the plain ones
                    same = all(a == p for o, pl in zip(outs, plain) for a, p in zip(o.tokens, pl.tokens))
                accept = committed / forwards if forwards else 0.0
                row = {"strategy": label, "rule": speculation.rule, "batch": b, "temperature": temp,
                       "accept_len": round(accept, 3),
                       "tok_s": round(ntok / sec, 2), "plain_tok_s": round(plain_tok_s, 2),
                       "speedup": round((ntok / sec) / plain_tok_s, 3), "tokens": ntok, "plain_tokens": plain_tok,
                       "groups": len(groups), "same_as_plain": same,
                       "verify_tokens": speculation.strategy.num_verify}
                rows.append(row)
                print(f"  {label:>14} {speculation.rule:>11}: accept {row['accept_len']:.2f}  "
                      f"{row['tok_s']:.1f} tok/s  "
                      f"x{row['speedup']:.2f}" + ("" if same is None else f"  same={same}"), flush=True)
    group_rows = group_table(model, drafter, all_prompts[:args.group_prompts], group_sizes, group_strategies,
                             RolloutSpec(max_new_tokens=args.new_tokens, stop_tokens=stops, chunk_steps=16,
                                         sampling=SamplingParams(temperature=args.group_temperature)),
                             args.seed, int(config.speculative.group_sources))
    if args.verify_sizes == "auto":
        sizes = sorted({1} | {sp.strategy.num_verify for _, sp in strategies + group_strategies})
    else:
        sizes = [int(v) for v in args.verify_sizes.split(",") if v]
    cost = verify_cost(model, sizes) if sizes else []
    ratio = {c["verify_tokens"]: c["ratio"] for c in cost}
    for row in rows:  # a verify of the row's V tokens, in decode steps (batch 1)
        row["verify_cost"] = ratio.get(row["verify_tokens"])
    if rows:
        print()
        print_table(rows, ["strategy", "rule", "batch", "temperature", "accept_len", "tok_s", "plain_tok_s",
                           "speedup", "verify_cost"])
    if group_rows:
        print()
        print_table(group_rows, ["strategy", "group", "epoch", "batch", "temperature", "accept_len", "tok_s",
                                 "plain_tok_s", "speedup"])
    if cost:
        print()
        print_table(cost, ["verify_tokens", "verify_ms", "decode_ms", "ratio"])
    write_json(args.json, {"rows": rows, "group_rows": group_rows, "verify_cost": cost, "machine": machine_info(),
                           "new_tokens": args.new_tokens, "drafter": meta.get("extra", {})})
    return 0


def group_table(model, drafter, prompts, group_sizes, strategies, spec: RolloutSpec, seed: int, sources: int):
    """Rows of the group table (module docstring): for each G, plain decoding and every strategy on the batch of
    ``prompts`` each repeated G times, epochs 1 and 2 (seeds ``seed + 1`` and ``seed + 2``)."""
    rows = []
    for g in group_sizes:
        batch = [p for p in prompts for _ in range(g)]
        plain = {}
        for epoch in (1, 2):
            generate(model, batch, spec, seed=seed + epoch)  # compiles (the first time)
            t0 = time.perf_counter()
            out = generate(model, batch, spec, seed=seed + epoch)
            plain[epoch] = int(out.lengths.sum()) / (time.perf_counter() - t0)
        print(f"group G={g} (batch {len(batch)}, T={spec.sampling.temperature:g}): plain "
              f"{plain[1]:.1f} / {plain[2]:.1f} tok/s", flush=True)
        for label, speculation in strategies:
            def run(epoch, store):
                return generate(model, batch, spec, speculation=speculation, seed=seed + epoch, store=store,
                                drafter=drafter if speculation.learned else None, group_sources=sources)
            run(1, GroupStore(4))  # compiles, with a store of its own
            store = GroupStore(4)
            for epoch in (1, 2):
                t0 = time.perf_counter()
                out = run(epoch, store)
                tok_s = int(out.lengths.sum()) / (time.perf_counter() - t0)
                row = {"strategy": label, "group": g, "epoch": epoch, "batch": len(batch),
                       "temperature": spec.sampling.temperature, "accept_len": round(out.accept_len, 3),
                       "tok_s": round(tok_s, 2), "plain_tok_s": round(plain[epoch], 2),
                       "speedup": round(tok_s / plain[epoch], 3)}
                rows.append(row)
                print(f"  {label:>22} epoch {epoch}: accept {row['accept_len']:.2f}  {tok_s:.1f} tok/s  "
                      f"x{row['speedup']:.2f}", flush=True)
    return rows


def verify_cost(model, sizes, prefix: int = 96, steps: int = 8, repeats: int = 5):
    """Milliseconds of one verify forward of V chained tokens versus one decode step, batch 1, same cache.

    Each is timed as ``steps`` forwards inside one jitted loop (each step's tokens depend on the previous
    step's logits, as in a rollout chunk), best of ``repeats`` runs, decode and verify alternating. At batch 1
    the speculative speedup is roughly accept_len x decode_ms / (verify_ms + drafting), so this ratio says how
    much acceptance a machine needs before speculation pays.
    """
    graphdef, params = nnx.split(model)
    cache = init_cache(model.cfg, 1, prefix + steps + 64)
    _, _, cache = prefill(model, jnp.ones((1, prefix), jnp.int32), jnp.ones((1, prefix), bool), cache)

    @jax.jit
    def dec(p, c, t):
        m = nnx.merge(graphdef, p)

        def body(_, carry):
            c, t = carry
            logits, _, c = decode(m, t, c)
            return c, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (c, t))[1]

    @functools.partial(jax.jit, static_argnums=3)
    def ver(p, c, t, v):
        m = nnx.merge(graphdef, p)
        pos = c.lengths[:, None] + jnp.arange(v, dtype=jnp.int32)[None]
        mask = causal_mask(v)[None]

        def body(_, t):
            logits, _, _ = verify(m, t, pos, mask, c)
            return jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, t)

    def ms(fn, *a):
        jax.block_until_ready(fn(*a))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        return (time.perf_counter() - t0) / steps * 1e3

    out = []
    for v in sizes:
        d, w = [], []
        for _ in range(repeats):
            d.append(ms(dec, params, cache, jnp.ones((1,), jnp.int32)))
            w.append(ms(ver, params, cache, jnp.ones((1, v), jnp.int32), v))
        d, w = min(d), min(w)
        out.append({"verify_tokens": v, "verify_ms": round(w, 2), "decode_ms": round(d, 2), "ratio": round(w / d, 3)})
        print(f"verify {v} tokens: {w:.1f} ms, decode step {d:.1f} ms (x{w / d:.2f})", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
