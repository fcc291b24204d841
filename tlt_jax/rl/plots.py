"""PNG plots of a training run from its metrics (reward, answer-length distribution, time split) and of its
held-out evaluations (accuracy, pass@k)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence


def write_plots(history: Sequence[Dict[str, Any]], out_dir: str) -> List[str]:
    """Writes reward.png, lengths.png and time_split.png to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    steps = [h["step"] for h in history]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["reward_mean"] for h in history], marker="o", label="reward mean")
    ax.plot(steps, [h["accuracy"] for h in history], marker=".", label="accuracy")
    ax.set_xlabel("RL step")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("Reward")
    paths.append(_save(fig, out_dir, "reward.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("len_p50", "p50"), ("len_p75", "p75"), ("len_p90", "p90"), ("len_max", "max")):
        ax.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("answer tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("Answer length distribution")
    paths.append(_save(fig, out_dir, "lengths.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(steps)
    for key in ("time_rollout", "time_reward", "time_logprob", "time_update"):
        vals = [h.get(key, 0.0) for h in history]
        ax.bar(steps, vals, bottom=bottom, label=key[len("time_"):])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("RL step")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("Time split per step")
    paths.append(_save(fig, out_dir, "time_split.png"))
    return paths


def write_eval_plot(summaries: Sequence[Dict[str, Any]], out_dir: str) -> str:
    """``eval.png``: greedy accuracy, mean@n, every pass@k and the format rate of the evaluation summaries
    against the RL step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    steps = [s["step"] for s in summaries]
    from matplotlib.ticker import MaxNLocator

    # pass@1 is mean@n by definition: one line for both
    keys = [k for k in summaries[-1] if k == "greedy_accuracy" or k.startswith("mean@")
            or (k.startswith("pass@") and k != "pass@1")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        label = key.replace("_", " ") + (" (= pass@1)" if key.startswith("mean@") else "")
        ax.plot(steps, [s.get(key, float("nan")) for s in summaries], marker="o", label=label)
    ax.plot(steps, [s.get("format_rate", float("nan")) for s in summaries], "--", color="gray", marker=".",
            label="format rate")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = summaries[-1]
    ax.set_xlabel("RL step")
    ax.set_ylabel("share (format: of answers)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"Held-out evaluation ({last['problems']} problems, {last['samples']} samples each)")
    return _save(fig, out_dir, "eval.png")


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
