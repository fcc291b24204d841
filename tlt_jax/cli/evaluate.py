"""Held-out evaluation of a policy: greedy accuracy, mean@n, unbiased pass@k, format rate, answer lengths.

    tlt-eval --config CFG [--checkpoint DIR [--step N]] [--workdir DIR] [--config.eval.*=...]

``--checkpoint``: a ``tlt-train`` work dir, its ``checkpoints`` dir or one step's dir (default step: the newest);
without it the config's own model is evaluated (step 0). The problems, samples and temperature are the config's
``eval`` section (see the README's "Evaluation"); the rollout is the run's own (the adaptive engine with TLT,
plain decoding with ``--config.tlt.enable=False``). Results go to DIR/eval/<step>.jsonl (one record per
problem), DIR/eval/<step>.summary.json and DIR/plots/eval.png, DIR being ``--workdir`` or else the
checkpoint's work dir; the summary is printed as one JSON line.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from tlt_jax.app.evaluator import evaluate_checkpoint
from tlt_jax.cli.common import config_main
from tlt_jax.core.jsonio import json_line, rounded

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _arguments(ap) -> None:
    ap.add_argument("--checkpoint", default="", help="a run's work dir, its checkpoints dir or a step's dir")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
    ap.add_argument("--workdir", default="", help="where eval/ and plots/ go (default: the checkpoint's run dir)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(config, args) -> int:
    step, result, path = evaluate_checkpoint(config, checkpoint=args.checkpoint or None, step=args.step,
                                             workdir=args.workdir or None, log=lambda m: print(m, flush=True),
                                             progress=not args.no_progress)
    print(f"[tlt] eval step {step}: " + json_line(rounded(result.summary)), end="", flush=True)
    if path is not None:
        print(f"[tlt] records {path}; summary {path[:-len('.jsonl')]}.summary.json", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return config_main("tlt-eval", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
