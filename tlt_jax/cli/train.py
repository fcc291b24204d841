"""GRPO training (the main job).

    tlt-train --config configs/smollm2_135m.py --workdir DIR [--resume] [--config.a.b=v ...]

TLT (speculative rollouts) is on by default; ``--config.tlt.enable=False`` runs the same job as the baseline
with plain rollouts. Metrics go to DIR/metrics.jsonl and DIR/tb, checkpoints to DIR/checkpoints, plots to
DIR/plots. ``--resume`` continues a run from its newest checkpoint.

Several processes (hosts) run one job when each is started with the same command plus its place in the job:
``--coordinator HOST:PORT --num-processes N --process-id I`` (or TLT_COORDINATOR, TLT_NUM_PROCESSES,
TLT_PROCESS_ID; ``tlt-launch`` sets them for processes on one machine), or ``--distributed`` where
jax.distributed detects the cluster itself (TPU pod slices, SLURM). See launch/ and the README.
"""

from __future__ import annotations

import os
import sys
import time

import jax

from tlt_jax.app.trainer import Trainer, step_line
from tlt_jax.cli.common import config_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _arguments(ap) -> None:
    ap.add_argument("--workdir", required=True, help="where metrics, checkpoints and plots go")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (one line per step instead)")


def main(argv=None) -> int:
    return config_main("tlt-train", __doc__, _arguments, run, argv, distributed=True)


def run(config, args) -> int:
    t0 = time.perf_counter()
    print(f"[tlt] config {config.name}: GRPO for {config.rl.steps} steps ({config.rl.prompts_per_step} prompts x "
          f"{config.rl.group_size} answers) on {len(jax.devices())} {jax.devices()[0].platform} device(s); "
          f"work dir {os.path.abspath(args.workdir)}", flush=True)
    trainer = Trainer(config, args.workdir, resume=args.resume, log=lambda m: print(m, flush=True))
    if trainer.step < int(config.rl.steps):
        trainer.precompile()  # the adaptive engine's programs, ahead of the first rollout
    history = trainer.run(progress=not args.no_progress, on_step=print_step if args.no_progress else None)
    wall = time.perf_counter() - t0
    if not history:
        print("[tlt] nothing to do: the run is already complete", flush=True)
        return 0
    q = max(1, len(history) // 4)
    first = sum(h["reward_mean"] for h in history[:q]) / q
    last = sum(h["reward_mean"] for h in history[-q:]) / q
    rollout = sum(h["time_rollout"] for h in history)
    steps = sum(h["step_time"] for h in history)
    line = (f"[tlt] done: {len(history)} steps; reward mean first quarter {first:.3f} -> last quarter {last:.3f}; "
            f"rollout {rollout:.0f}s of {steps:.0f}s step time; wall {wall:.0f}s")
    if any("accept_len" in h for h in history):
        acc = [h["accept_len"] for h in history if "accept_len" in h]
        line += f"; acceptance length {sum(acc) / len(acc):.2f}"
    print(line, flush=True)
    print(f"[tlt] metrics {trainer.metrics_path}; plots {os.path.join(trainer.workdir, 'plots')}", flush=True)
    return 0


def print_step(metrics) -> None:
    print(step_line(metrics), end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
