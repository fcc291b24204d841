"""The GRPO update of one RL step's batch: every mini-batch at the batch's answer width, or each at its own.

    python -m tlt_jax.bench.update [--config PATH] [--step 1] [--reps 2] [--json PATH] [--config.a.b=v ...]

The prompts of RL step ``--step`` (``rl.prompts_per_step`` x ``rl.group_size`` rows, the training order and
seeds) are answered by the initial policy with plain decoding at ``rollout.temperature`` and scored by the
config's reward, as the training step does; then the step's updates (``rl.minibatches`` of them, rows in the
step's seeded order) are timed from the same policy and optimizer state in two layouts, alternating:

* ``batch``: every mini-batch padded to the answer width that holds the batch's longest answer;
* ``minibatch`` (what training does): each mini-batch cut to the width of its own longest answer, so with a
  long-tailed batch only the mini-batch that holds a long answer pays for it.

Both layouts compile every width first (untimed). Printed: the widths, the seconds per repetition and their
median, ``speedup`` (batch / minibatch), and the largest parameter difference between the two layouts' results
(floating-point summation order only). Example: ``--config configs/smollm2_135m_longtail.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from tlt_jax.app.trainer import Trainer
from tlt_jax.bench.common import config_overrides, machine_info, print_table, write_json
from tlt_jax.bench.lengths import plain_job_config
from tlt_jax.core.seeds import stream_seed

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYOUTS = ("batch", "minibatch")


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_135m.py")
    ap.add_argument("--step", type=int, default=1, help="the RL step whose prompts are answered (>= 1)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions of each layout (>= 1)")
    ap.add_argument("--json", default="")
    args, rest = ap.parse_known_args(argv)
    if args.step < 1:
        ap.error("--step must be >= 1")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    overrides = config_overrides(ap, rest)
    config = plain_job_config(args.config, overrides)  # before anything starts JAX
    index = args.step - 1
    g = int(config.rl.group_size)

    with tempfile.TemporaryDirectory(prefix="tlt_update_") as workdir:
        trainer = Trainer(config, workdir, log=lambda m: print(m, flush=True))
        rl = trainer.rl
        idx = trainer.prompt_indices(index)
        prompts = [trainer.prompt_ids[i] for i in idx for _ in range(g)]
        golds = [trainer.golds[i] for i in idx for _ in range(g)]
        t0 = time.perf_counter()
        out = trainer.rollout(prompts, seed=stream_seed(int(config.seed), "rollout", index))
        print(f"[update] step {args.step}: {len(prompts)} answers, longest {max(out.lengths)} of "
              f"{rl.max_new_tokens} ({time.perf_counter() - t0:.1f}s rollout)", flush=True)
        tokens, valid, amask, adv = rl.batch(prompts, out.tokens, rl.score(out, golds, g)[3])
        old_logp, ref_logp, _ = rl.logprobs(tokens, valid, amask.shape[1])
        params0, opt0 = _copy(rl.params), _copy(rl.opt_state)

        def updates(layout):
            rl.params, rl.opt_state = _copy(params0), _copy(opt0)
            jax.block_until_ready((rl.params, rl.opt_state))
            t = time.perf_counter()
            sums, skipped, widths = rl.update(index, tokens, valid, amask, adv, old_logp, ref_logp,
                                              own_widths=layout == "minibatch")
            jax.block_until_ready(rl.params)
            return time.perf_counter() - t, sums, skipped, widths

        for layout in LAYOUTS:  # compiles every width the layout uses
            t = updates(layout)[0]
            print(f"[update] {layout}: compiled and ran once in {t:.1f}s", flush=True)
        times = {k: [] for k in LAYOUTS}
        final, info = {}, {}
        for rep in range(args.reps):
            for layout in (LAYOUTS if rep % 2 == 0 else LAYOUTS[::-1]):
                t, sums, skipped, widths = updates(layout)
                times[layout].append(t)
                final[layout] = [np.asarray(x) for x in jax.tree.leaves(rl.params)]
                info[layout] = {"widths": widths, "skipped": skipped, "pg_loss": sums.get("pg_loss")}
                print(f"[update] rep {rep + 1}/{args.reps} {layout}: {t:.1f}s (widths {widths})", flush=True)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(final["batch"], final["minibatch"]))
    table = [{"layout": k, "widths": " ".join(map(str, info[k]["widths"])), "median_s": float(np.median(times[k])),
              "runs_s": " ".join(f"{x:.1f}" for x in times[k])} for k in LAYOUTS]
    print()
    print_table(table, ["layout", "widths", "median_s", "runs_s"])
    speedup = table[0]["median_s"] / table[1]["median_s"]
    lengths = [int(n) for n in out.lengths]
    print(f"\nspeedup (batch / minibatch) {speedup:.2f}; the two layouts' parameters differ by at most {diff:.2e}; "
          f"answer lengths p50 {np.percentile(lengths, 50):.0f}, max {max(lengths)}")
    write_json(args.json, {"machine": machine_info(), "config": args.config, "overrides": overrides,
                           "step": args.step, "lengths": lengths, "layouts": info, "times_s": times,
                           "summary": {"speedup": speedup, "max_param_diff": diff}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
