"""Answer lengths of a config's task at its rollout temperature: how long-tailed is the workload?

    python -m tlt_jax.bench.lengths [--config PATH] [--steps 4] [--json PATH] [--config.a.b=v ...]

The RL steps' prompts (``rl.prompts_per_step`` x ``rl.group_size`` rows per step, in the training order and
with the training seeds) are answered by the initial policy with plain decoding at ``rollout.temperature``, up
to ``rollout.max_new_tokens``; nothing is trained. Printed per step and over all steps: the length
percentiles, p90 / p50 (the tail: how much longer the slow answers are than the typical one) and the share of
answers cut at the cap. A task fit to show the long tail has p90 / p50 >= 3 and a minority of answers at the
cap. Example: ``--config configs/smollm2_135m_longtail.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Sequence

import numpy as np

from tlt_jax.app import specs
from tlt_jax.app.config import load_config
from tlt_jax.app.trainer import Trainer
from tlt_jax.bench.common import config_overrides, machine_info, print_table, write_json
from tlt_jax.core.seeds import stream_seed
from tlt_jax.parallel.mesh import apply_cpu_devices
from tlt_jax.rl.step import percentiles

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tail_stats(lengths, cap: int) -> dict:
    """The training log's length percentiles, plus p10, p90 / p50 and the share of answers at the cap."""
    x = np.asarray(lengths, np.float64)
    pct = percentiles(x)
    return {"answers": int(x.size), "len_p10": float(np.percentile(x, 10)), **pct,
            "p90_over_p50": pct["len_p90"] / max(pct["len_p50"], 1.0), "at_cap": float(np.mean(x >= cap))}


def plain_job_config(path: str, overrides: Sequence[str]):
    """The config's job with plain rollouts on the whole host as one device and no plots (the benchmarks that
    answer its prompts with the initial policy); sets that device count, so it runs before anything starts JAX."""
    config = load_config(path, list(overrides) + ["tlt.enable=False", "mesh.cpu_devices=0", "train.plots=False",
                                                  "train.tensorboard=False"])
    apply_cpu_devices(specs.cpu_devices(config))
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_135m.py")
    ap.add_argument("--steps", type=int, default=4, help="RL steps whose prompts are answered (>= 1)")
    ap.add_argument("--json", default="")
    args, rest = ap.parse_known_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    overrides = config_overrides(ap, rest)
    config = plain_job_config(args.config, overrides)

    cap = int(config.rollout.max_new_tokens)
    g = int(config.rl.group_size)
    rows, every = [], []
    with tempfile.TemporaryDirectory(prefix="tlt_lengths_") as workdir:
        trainer = Trainer(config, workdir, log=lambda m: print(m, flush=True))
        for step in range(args.steps):
            prompts = [trainer.prompt_ids[i] for i in trainer.prompt_indices(step) for _ in range(g)]
            t0 = time.perf_counter()
            out = trainer.rollout(prompts, seed=stream_seed(int(config.seed), "rollout", step))
            lengths = [int(n) for n in out.lengths]
            every += lengths
            rows.append({"step": step + 1, **tail_stats(lengths, cap), "rollout_s": time.perf_counter() - t0})
            r = rows[-1]
            print(f"[lengths] step {step + 1}/{args.steps}: p50 {r['len_p50']:.0f}, p90 {r['len_p90']:.0f}, "
                  f"max {r['len_max']:.0f}, at cap {100 * r['at_cap']:.0f}% ({r['rollout_s']:.1f}s)", flush=True)
    total = {"step": "all", **tail_stats(every, cap), "rollout_s": sum(r["rollout_s"] for r in rows)}
    print()
    print_table(rows + [total], ["step", "answers", "len_p10", "len_p50", "len_p90", "len_max", "p90_over_p50",
                                 "at_cap", "rollout_s"])
    print(f"\ncap {cap} new tokens, T = {float(config.rollout.temperature):g}: p90 / p50 = "
          f"{total['p90_over_p50']:.2f}, {100 * total['at_cap']:.1f}% of answers at the cap")
    write_json(args.json, {"machine": machine_info(), "config": args.config, "overrides": overrides,
                           "cap": cap, "rows": rows, "summary": total})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
