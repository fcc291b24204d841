"""The paper's figures and tables at this codebase's scale: one command per artefact, each writing NAME.json and
NAME.png.

    python -m tlt_jax.bench.figures NAME [NAME ...] [--out figures] [--from PATH] [--quick] [--config PATH]
        [--config.a.b=v ...]
    tlt-figures NAME ...          (the same program)
    tlt-figures --list

NAME is one of the artefacts below, or ``all``. Each is drawn from the JSON of the measurement behind it, which
is never timed twice: several names that share a measurement are drawn from one run of it. With ``--from PATH``
the measurement is read instead of run (a benchmark's ``--json`` file or a training run's work dir); without
it, the program runs the measurement first and keeps its raw output as ``<out>/sources/<kind>.json``.

=========  ====================================================================  ===============================
name       artefact                                                              measurement (``--from``)
=========  ====================================================================  ===============================
fig1       answer-length distribution per RL step (violins; p50 / p90 / max)     a training run (work dir or
                                                                                 its metrics.jsonl)
fig11      rollout and end-to-end step time, baseline / TLT-Base / TLT           ``bench.rl_step --json``
fig12      reward and accuracy vs RL step, TLT vs baseline, over seeds           ``figures --worker seeds``
fig13      acceptance length and speedup over tree depth x verified tokens,      ``bench.speculative --json``
           batch 1
fig14      live rows vs time in one rollout of the adaptive engine, the arm in   ``figures --worker rollout``
           use shaded
table4     speedup over batch size x verified tokens                             ``bench.speculative --json``
table6     acceptance of the adaptive vs the frozen drafter per RL step          ``bench.rl_step --json``
=========  ====================================================================  ===============================

Measurements when run here (``--config`` is the workload of the RL figures, default
``configs/smollm2_135m_longtail.py``; fig12 uses ``configs/smollm2_135m.py`` unless ``--config`` is given):
fig1 trains the config's job for ``rl.steps``; fig11 / table6 run ``bench.rl_step --steps 2 --adaptive-steps 6``;
fig12 trains the baseline and TLT for ``--seeds`` seeds x ``--steps`` steps; fig13 / table4 run
``bench.speculative`` on the embedded model over a grid of trees; fig14 runs one rollout of the job's first
step. ``--quick`` runs every measurement on the tiny random model (``configs/tiny.py``, a random drafter, a few
steps of 16 tokens) in a few minutes: it checks the pipeline, its numbers mean nothing.

``NAME.json``: ``{"figure", "format", "title", "source", "machine", "data"}``; :func:`load` reads one back (the
notebook ``notebooks/paper_figures.ipynb`` draws every figure from these files with :func:`draw`). A figure name
that does not exist, a source JSON of another benchmark or a file of an older format is an error that names the
file and what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from flax import nnx
from tqdm import tqdm

from tlt_jax.app import specs
from tlt_jax.app.build import model_from_config
from tlt_jax.app.config import load_config
from tlt_jax.app.trainer import Trainer
from tlt_jax.bench.common import config_overrides, machine_info, write_json
from tlt_jax.core import jsonio
from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.io.drafter import save_drafter
from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel.mesh import apply_cpu_devices
from tlt_jax.rl import checkpoints
from tlt_jax.rollout.tree import SpecStrategy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMAT = 1
DEFAULT_CONFIG = "configs/smollm2_135m_longtail.py"
SEEDS_CONFIG = "configs/smollm2_135m.py"
QUICK_CONFIG = "configs/tiny.py"
# the tiny random model with the embedded tokenizer, 16 new tokens, 2 prompts x 2 answers, one learned arm
QUICK = ["model.arch.vocab_size=49152", "model.tokenizer=embedded:smollm2", "rollout.max_prompt_len=128",
         "rollout.max_new_tokens=16", "rl.prompts_per_step=2", "rl.group_size=2", "rl.lr=1e-3",
         "tlt.plain_arm=False", "tlt.arms=('chain-2',)", "rl.steps=2", "train.checkpoint_every=100",
         "train.plots=False", "train.tensorboard=False"]
# fig13's grid (depth x verified tokens, top-k 4 where a tree needs it) and table 4's batches
GRID_DEPTHS = (2, 4, 6, 8)
GRID_VERIFY = (4, 8, 16, 32)
TABLE4_BATCHES = (1, 4, 16)


class FigureError(InputError):
    """A figure name that does not exist, or an input JSON that is not the one a figure is drawn from."""


# ---------------------------------------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class Source:
    kind: str
    what: str  # what produces it, for messages
    keys: Sequence[str]  # top-level keys its JSON must hold
    row_keys: Sequence[str] = ()  # keys every element of payload["rows"] must hold


SOURCES = {
    "train": Source("train", "a training run (tlt-train's work dir)", ("rows", "cap", "temperature"),
                    ("step", "lengths", "len_p50", "len_p90", "len_max")),
    "rl_step": Source("rl_step", "python -m tlt_jax.bench.rl_step --json", ("rows", "summary", "steps",
                                                                            "adaptive_steps"),
                      ("mode", "step", "rollout_s", "step_s", "probe_accept", "probe_initial", "tokens")),
    "seeds": Source("seeds", "python -m tlt_jax.bench.figures fig12", ("runs", "steps")),
    "speculative": Source("speculative", "python -m tlt_jax.bench.speculative --json", ("rows",),
                          ("strategy", "rule", "batch", "temperature", "accept_len", "speedup", "verify_tokens")),
    "rollout": Source("rollout", "python -m tlt_jax.bench.figures fig14",
                      ("timeline", "rollout_s", "sd_threshold", "replicas")),
}


def check_source(kind: str, payload: Any, path: str) -> Dict[str, Any]:
    """``payload`` as the measurement ``kind`` writes it, or a FigureError naming ``path`` and the missing keys."""
    src = SOURCES[kind]
    if not isinstance(payload, dict):
        raise FigureError(f"{path}: expected the JSON object of {src.what}, got {type(payload).__name__}")
    missing = [k for k in src.keys if k not in payload]
    if missing:
        raise FigureError(f"{path} is not the output of {src.what}: missing keys {missing}")
    rows = payload.get("rows", [])
    if src.row_keys:
        if not rows:
            raise FigureError(f"{path}: {src.what} wrote no rows")
        lacking = sorted({k for r in rows for k in src.row_keys if k not in r})
        if lacking:
            raise FigureError(f"{path}: rows lack keys {lacking} (the output of an older {src.what}?); "
                              f"rerun it")
    return payload


def read_source(kind: str, path: str) -> Dict[str, Any]:
    """The measurement ``kind`` from ``path``: a JSON file, or (``train``) a work dir or its metrics.jsonl."""
    if not os.path.exists(path):
        raise FigureError(f"--from {path}: no such file or directory")
    if kind == "train" and (os.path.isdir(path) or path.endswith(".jsonl")):
        return check_source(kind, train_source(path), path)
    if os.path.isdir(path):
        raise FigureError(f"--from {path} is a directory; {SOURCES[kind].what} writes one JSON file")
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as e:
        raise FigureError(f"{path} is not JSON ({e})") from None
    return check_source(kind, payload, path)


def train_source(path: str) -> Dict[str, Any]:
    """A training run's rows (metrics.jsonl) with the answer cap and temperature of its config.json."""
    workdir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    metrics = checkpoints.metrics_path(workdir) if os.path.isdir(path) else path
    config = os.path.join(workdir, "config.json")
    for p in (metrics, config):
        if not os.path.exists(p):
            raise FigureError(f"{workdir} is not a training run's work dir: no {os.path.basename(p)}")
    rows, evals = checkpoints.read_metrics(metrics)
    with open(config) as f:
        cfg = json.load(f)
    rollout = cfg.get("rollout", {})
    return {"rows": rows, "evals": evals,
            "config": cfg.get("name", ""), "cap": rollout.get("max_new_tokens"),
            "temperature": rollout.get("temperature")}


# ---------------------------------------------------------------------------------------------- figures

@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    title: str
    source: str  # a key of SOURCES
    extract: Callable[[Dict[str, Any]], Dict[str, Any]]  # source payload -> the figure's data
    draw: Callable[[Any, Dict[str, Any]], None]  # (matplotlib figure, data) -> draws
    size: tuple = (7.5, 4.2)


def _steps_of(rows, mode):
    return sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["step"])


def extract_fig1(src):
    rows = sorted(src["rows"], key=lambda r: r["step"])
    return {"config": src.get("config", ""), "cap": src["cap"], "temperature": src["temperature"],
            "steps": [r["step"] for r in rows], "lengths": [list(r["lengths"]) for r in rows],
            "p50": [r["len_p50"] for r in rows], "p90": [r["len_p90"] for r in rows],
            "max": [r["len_max"] for r in rows]}


def draw_fig1(fig, d):
    ax = fig.add_subplot(1, 1, 1)
    steps = d["steps"]
    parts = ax.violinplot(d["lengths"], positions=steps, widths=0.8, showextrema=False)
    for body in parts["bodies"]:
        body.set_alpha(0.35)
    ax.plot(steps, d["p50"], "o-", ms=4, label="p50")
    ax.plot(steps, d["p90"], "s-", ms=4, label="p90")
    ax.plot(steps, d["max"], "^-", ms=4, label="max")
    if d["cap"]:
        ax.axhline(d["cap"], color="gray", ls="--", lw=1, label=f"cap ({d['cap']} tokens)")
    ax.set_xticks(steps)
    ax.set_xlabel("RL step")
    ax.set_ylabel("answer length (tokens)")
    ratio = [p90 / p50 for p50, p90 in zip(d["p50"], d["p90"]) if p50]
    where = f"{os.path.basename(d['config'] or '')}, T = {d['temperature']}"
    ax.set_title(f"Answer lengths per RL step\n({where}; p90 / p50 {min(ratio):.1f}-{max(ratio):.1f})" if ratio else
                 f"Answer lengths per RL step\n({where})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)


FIG11_MODES = (("baseline", "baseline"), ("tlt_base", "TLT-Base"), ("tlt", "TLT"))


def extract_fig11(src):
    k = int(src["steps"])
    out = {"steps": k, "config": src.get("config", ""), "modes": [], "labels": [], "rollout_s": [], "step_s": []}
    for mode, label in FIG11_MODES:
        rows = [r for r in _steps_of(src["rows"], mode) if r["step"] <= k]
        if len(rows) != k:
            continue
        out["modes"].append(mode)
        out["labels"].append(label)
        out["rollout_s"].append(sum(r["rollout_s"] for r in rows))
        out["step_s"].append(sum(r["step_s"] for r in rows))
    if "baseline" not in out["modes"]:
        raise FigureError("fig11 needs the baseline mode of bench.rl_step (its rows have none)")
    return out


def draw_fig11(fig, d):
    axes = fig.subplots(1, 2)
    base = d["modes"].index("baseline")
    for ax, key, what in ((axes[0], "rollout_s", "rollout"), (axes[1], "step_s", "end-to-end step")):
        vals = d[key]
        bars = ax.bar(d["labels"], vals, color=["#888888", "#4c72b0", "#dd8452"][:len(vals)])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f} s\n{vals[base] / v:.2f}x", (b.get_x() + b.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(vals) * 1.25)
        ax.set_ylabel("seconds")
        ax.set_title(f"{what} time, {d['steps']} RL step(s)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"RL step time ({os.path.basename(str(d['config']))}); x = speedup over the baseline", fontsize=10)


def extract_fig12(src):
    runs = src["runs"]
    return {"config": src.get("config", ""), "steps": src["steps"], "runs": runs, **_seed_spread(runs)}


def _seed_spread(runs):
    """The per-step gap between the two modes' seed means against the seeds' spread within each mode."""
    by = {}
    for r in runs:
        by.setdefault(r["mode"], []).append(r["reward"])
    if len(by) < 2:
        return {"max_gap": None, "seed_spread": None}
    n = min(len(x) for v in by.values() for x in v)
    mean = {m: [sum(x[i] for x in v) / len(v) for i in range(n)] for m, v in by.items()}
    spread = max(max(x[i] for x in v) - min(x[i] for x in v) for v in by.values() for i in range(n))
    a, b = list(mean)[:2]
    return {"max_gap": max(abs(mean[a][i] - mean[b][i]) for i in range(n)), "seed_spread": spread}


def draw_fig12(fig, d):
    axes = fig.subplots(1, 2)
    colors = {"baseline": "#888888", "tlt": "#dd8452"}
    for ax, key, label in ((axes[0], "reward", "reward (mean over the step's answers)"),
                           (axes[1], "accuracy", "accuracy (share correct)")):
        for mode in sorted({r["mode"] for r in d["runs"]}):
            runs = [r for r in d["runs"] if r["mode"] == mode]
            n = min(len(r[key]) for r in runs)
            steps = list(range(1, n + 1))
            for r in runs:
                ax.plot(steps, r[key][:n], color=colors.get(mode), alpha=0.35, lw=1)
            mean = [sum(r[key][i] for r in runs) / len(runs) for i in range(n)]
            ax.fill_between(steps, [min(r[key][i] for r in runs) for i in range(n)],
                            [max(r[key][i] for r in runs) for i in range(n)], color=colors.get(mode), alpha=0.15)
            ax.plot(steps, mean, "o-", color=colors.get(mode), ms=4,
                    label=f"{'TLT' if mode == 'tlt' else mode} (mean of {len(runs)} seeds, band: min-max)")
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gap = d.get("max_gap")
    fig.suptitle("Reward vs RL step, the same seeds" + (
        f": largest gap of the means {gap:.3f}, seed spread {d['seed_spread']:.3f}" if gap is not None else ""),
        fontsize=10)


def _grid_rows(src, batch=None):
    rows = src["rows"]
    temps = sorted({r["temperature"] for r in rows})
    temp = temps[-1]  # the sampling regime when the run measured several
    sel = [r for r in rows if r["temperature"] == temp and (batch is None or r["batch"] == batch)
           and not r["strategy"].partition("@")[0].partition(":")[1]]  # learned-drafter strategies only
    if not sel:
        raise FigureError(f"the speculative benchmark's rows hold no learned-drafter strategy"
                          f"{'' if batch is None else f' at batch {batch}'} (at T = {temp})")
    return temp, sel


def _best(rows, key):
    """Per cell, the row with the highest speedup (several rules or strategies may share a cell)."""
    out = {}
    for r in rows:
        k = key(r)
        if k not in out or r["speedup"] > out[k]["speedup"]:
            out[k] = r
    return out


def extract_fig13(src):
    temp, rows = _grid_rows(src, batch=1)
    cells = _best(rows, lambda r: (SpecStrategy.parse(r["strategy"].partition("@")[0]).depth, r["verify_tokens"]))
    depths = sorted({k[0] for k in cells})
    verify = sorted({k[1] for k in cells})

    def grid(field):
        return [[cells[(dp, v)][field] if (dp, v) in cells else None for v in verify] for dp in depths]

    return {"temperature": temp, "batch": 1, "depths": depths, "verify": verify, "accept_len": grid("accept_len"),
            "speedup": grid("speedup"),
            "strategies": [[cells[(dp, v)]["strategy"] + "@" + cells[(dp, v)]["rule"] if (dp, v) in cells
                            else None for v in verify] for dp in depths]}


def _heatmap(ax, grid, xs, ys, title, fmt, cmap):
    a = np.array([[math.nan if v is None else v for v in row] for row in grid], dtype=float)
    im = ax.imshow(a, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            v = a[i, j]
            # white on the dark cells, black on the light ones (the cell's luminance in the colour map)
            r, g, b, _ = im.cmap(im.norm(v)) if not math.isnan(v) else (1, 1, 1, 1)
            color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
            ax.text(j, i, "-" if math.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title, fontsize=10)
    return im


def draw_fig13(fig, d):
    axes = fig.subplots(1, 2)
    for ax, key, title, fmt, cmap in ((axes[0], "accept_len", "acceptance length (tokens / verify)", "{:.2f}",
                                       "viridis"),
                                      (axes[1], "speedup", "speedup over plain decoding", "{:.2f}x", "RdYlGn")):
        im = _heatmap(ax, d[key], d["verify"], d["depths"], title, fmt, cmap)
        ax.set_xlabel("verified tokens per step")
        ax.set_ylabel("tree depth")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Draft trees at batch 1, T = {d['temperature']:g}", fontsize=10)


def extract_table4(src):
    temp, rows = _grid_rows(src)
    cells = _best(rows, lambda r: (r["batch"], r["verify_tokens"]))
    batches = sorted({k[0] for k in cells})
    verify = sorted({k[1] for k in cells})
    return {"temperature": temp, "batches": batches, "verify": verify,
            "speedup": [[cells[(b, v)]["speedup"] if (b, v) in cells else None for v in verify] for b in batches],
            "strategies": [[cells[(b, v)]["strategy"] if (b, v) in cells else None for v in verify]
                           for b in batches]}


def draw_table4(fig, d):
    ax = fig.add_subplot(1, 1, 1)
    im = _heatmap(ax, d["speedup"], d["verify"], d["batches"],
                  f"Speedup over plain decoding, best tree per cell (T = {d['temperature']:g})", "{:.2f}x", "RdYlGn")
    ax.set_xlabel("verified tokens per step")
    ax.set_ylabel("batch size (rows)")
    fig.colorbar(im, ax=ax, shrink=0.8)


def extract_table6(src):
    tlt = _steps_of(src["rows"], "tlt")
    frozen = {r["step"]: r for r in _steps_of(src["rows"], "frozen")}
    if not tlt or not frozen:
        raise FigureError("table6 needs the tlt and frozen modes of bench.rl_step (its rows lack one)")
    steps = [r["step"] for r in tlt if r["step"] in frozen]
    by = {r["step"]: r for r in tlt}
    return {"config": src.get("config", ""), "steps": steps,
            "adaptive": [by[s]["probe_accept"] for s in steps],
            "initial": [by[s]["probe_initial"] for s in steps],
            "frozen": [frozen[s]["probe_accept"] for s in steps],
            "ratio_vs_frozen": src["summary"].get("accept_ratio_adaptive_vs_frozen"),
            "ratio_vs_initial": src["summary"].get("accept_ratio_adaptive_vs_initial")}


def draw_table6(fig, d):
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(d["steps"], d["adaptive"], "o-", label="adaptive (spot-trained) drafter")
    ax.plot(d["steps"], d["frozen"], "s-", label="frozen drafter (its own run)")
    if any(v is not None for v in d["initial"]):
        ax.plot(d["steps"], [math.nan if v is None else v for v in d["initial"]], "^--",
                label="initial drafter on the adaptive run's policy")
    ax.set_xticks(d["steps"])
    ax.set_xlabel("RL step")
    ax.set_ylabel("acceptance length (chain-4 probe)")
    r1, r2 = d.get("ratio_vs_frozen"), d.get("ratio_vs_initial")
    ax.set_title("Adaptive vs frozen drafter" + (f": last steps {r1:.2f}x frozen, {r2:.2f}x initial"
                                                  if r1 is not None and r2 is not None else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def extract_fig14(src):
    return {"config": src.get("config", ""), "rollout_s": src["rollout_s"], "sd_threshold": src["sd_threshold"],
            "replicas": src["replicas"], "timeline": src["timeline"], "tokens": src.get("tokens")}


def draw_fig14(fig, d):
    """One panel per replica (a shared time axis): its live rows, its speculating chunks shaded by arm."""
    arms = sorted({c["arm"] for c in d["timeline"]} - {"plain"})
    cmap = {a: c for a, c in zip(arms, ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"])}
    reps = int(d["replicas"])
    first = [c["t_start"] for c in d["timeline"] if c["arm"] != "plain"]
    axes = fig.subplots(reps, 1, sharex=True, squeeze=False)[:, 0]
    for rep, ax in enumerate(axes):
        chunks = sorted((c for c in d["timeline"] if c["replica"] == rep), key=lambda c: c["t_end"])
        if chunks:
            ts = [chunks[0]["t_start"]] + [c["t_end"] for c in chunks]
            live = [chunks[0]["live_before"]] + [c["live_after"] for c in chunks]
            ax.step(ts, live, where="post", lw=1.5, color="#4c72b0", label="live rows")
        shaded = set()
        for c in chunks:
            if c["arm"] != "plain":
                ax.axvspan(c["t_start"], c["t_end"], color=cmap[c["arm"]], alpha=0.25, lw=0,
                           label=None if c["arm"] in shaded else f"speculating: {c['arm']}")
                shaded.add(c["arm"])
        if first:
            ax.axvline(min(first), color="black", ls=":", lw=1,
                       label=f"speculation on ({min(first):.1f} s)" if rep == 0 else None)
        ax.axhline(d["sd_threshold"], color="gray", ls="--", lw=1,
                   label=f"threshold ({d['sd_threshold']} rows)" if rep == 0 else None)
        spec_chunks = sum(c["arm"] != "plain" for c in chunks)
        ax.set_ylabel(f"replica {rep}\nlive rows", fontsize=9)
        ax.text(0.01, 0.06, f"{spec_chunks} of {len(chunks)} chunks speculating", transform=ax.transAxes,
                fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("rollout time (s)")
    axes[0].set_title(f"One rollout of the adaptive engine ({os.path.basename(str(d['config']))}, "
                      f"{d['rollout_s']:.1f} s)", fontsize=10)


FIGURES: Dict[str, Figure] = {f.name: f for f in (
    Figure("fig1", "Fig 1: answer lengths per RL step", "train", extract_fig1, draw_fig1),
    Figure("fig11", "Fig 11: rollout and step time, baseline / TLT-Base / TLT", "rl_step", extract_fig11, draw_fig11,
           (9, 4)),
    Figure("fig12", "Fig 12: reward vs step, TLT vs baseline over seeds", "seeds", extract_fig12, draw_fig12, (10, 4)),
    Figure("fig13", "Fig 13: acceptance and speedup over depth x verified tokens", "speculative", extract_fig13,
           draw_fig13, (10, 4)),
    Figure("fig14", "Fig 14: live rows vs time in one rollout", "rollout", extract_fig14, draw_fig14,
           (7.5, 5.2)),
    Figure("table4", "Table 4: speedup over batch x verified tokens", "speculative", extract_table4, draw_table4,
           (6.5, 4)),
    Figure("table6", "Table 6: adaptive vs frozen drafter acceptance", "rl_step", extract_table6, draw_table6),
)}


def figure(name: str) -> Figure:
    if name not in FIGURES:
        raise FigureError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return FIGURES[name]


def make(name: str, payload: Dict[str, Any], source: Dict[str, Any]) -> Dict[str, Any]:
    """The NAME.json object of figure ``name`` drawn from a source ``payload``."""
    f = figure(name)
    return {"figure": name, "format": FORMAT, "title": f.title, "source": source,
            "machine": payload.get("machine"), "data": f.extract(payload)}


def load(path: str) -> Dict[str, Any]:
    """A NAME.json written by this program (FigureError naming the file if it is not one, or of another
    format)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FigureError(f"{path}: cannot read a figure's JSON ({e})") from None
    missing = [k for k in ("figure", "format", "data") if k not in obj] if isinstance(obj, dict) else ["figure"]
    if missing:
        raise FigureError(f"{path} is not a figure's JSON: missing keys {missing}")
    if obj["format"] != FORMAT:
        raise FigureError(f"{path} has figure format {obj['format']}, this program reads format {FORMAT}: redraw "
                          f"it with tlt-figures {obj['figure']}")
    figure(obj["figure"])
    return obj


def draw(obj: Dict[str, Any], path: Optional[str] = None):
    """A matplotlib figure of ``obj`` (from :func:`make` or :func:`load`); saved as a PNG when ``path`` is given.
    In a notebook the returned figure shows inline."""
    import matplotlib.pyplot as plt

    f = figure(obj["figure"])
    fig = plt.figure(figsize=f.size)
    f.draw(fig, obj["data"])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig


def markdown(obj: Dict[str, Any]) -> str:
    """The tables (table4, table6) as Markdown, as the README shows them; '' for the figures."""
    d = obj["data"]

    def fmt(v, unit=""):
        return "–" if v is None else f"{v:.2f}{unit}"

    if obj["figure"] == "table4":
        head = "| batch | " + " | ".join(f"V = {v}" for v in d["verify"]) + " |"
        lines = [head, "| ---: |" + " ---: |" * len(d["verify"])]
        lines += [f"| {b} | " + " | ".join(fmt(v, "×") for v in row) + " |"
                  for b, row in zip(d["batches"], d["speedup"])]
        return "\n".join(lines)
    if obj["figure"] == "table6":
        lines = ["| RL step | frozen | adaptive | initial drafter, adaptive run's policy |",
                 "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {s} | {fmt(f)} | {fmt(a)} | {fmt(i)} |"
                  for s, f, a, i in zip(d["steps"], d["frozen"], d["adaptive"], d["initial"])]
        return "\n".join(lines)
    return ""


# ---------------------------------------------------------------------------------------------- measuring

def _run(cmd: List[str]) -> None:
    print("[figures] $ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"[figures] the measurement failed (exit status {rc}): {' '.join(cmd)}")


def _random_drafter(config_path: str, overrides: Sequence[str], directory: str) -> str:
    """A random drafter for the quick runs' tiny target (they check the pipeline, not the numbers)."""
    if not os.path.isdir(directory):  # one for every measurement of the invocation
        _, model = model_from_config(load_config(config_path, list(overrides)), None)
        save_drafter(directory, Drafter(model.cfg, nnx.Rngs(0)), model)
    return directory


def measure(kind: str, args, work: str) -> Dict[str, Any]:
    """Runs the measurement ``kind`` (each in a process of its own: a device layout is fixed when JAX starts)."""
    out = os.path.join(work, f"{kind}.json")
    py = [sys.executable, "-m"]
    over = list(args.overrides)
    if args.quick:
        over = QUICK + over  # every quick run's TLT parts use a random drafter
        over.append("drafter.checkpoint=" + _random_drafter(args.config, over, os.path.join(work, "drafter")))
    cfg = ["--config", args.config] + [f"--config.{o}" for o in over]
    if kind == "rl_step":
        steps = ["--steps", "1", "--adaptive-steps", "2", "--overhead-reps", "0"] if args.quick else \
            ["--steps", "2", "--adaptive-steps", "6", "--overhead-reps", "1"]
        _run(py + ["tlt_jax.bench.rl_step", "--json", out] + steps + cfg)
    elif kind == "speculative":
        if args.quick:
            strategies, batches, extra = "2_2_3,2_2_5,3_2_4,3_2_6", "1,2", ["--new-tokens", "16", "--min-rows", "1"]
        else:
            strategies = ",".join(grid_strategies())
            batches, extra = ",".join(map(str, TABLE4_BATCHES)), []
        _run(py + ["tlt_jax.bench.speculative", "--json", out, "--batches", batches, "--temperatures", "0.7",
                   "--rules", "sampled", "--strategies", strategies, "--groups", "", "--verify-sizes", ""] + extra
             + cfg)
    else:  # train / seeds / rollout: this program's own worker
        _run(py + ["tlt_jax.bench.figures", "--worker", kind, "--json", out, "--seeds", str(args.seeds),
                   "--steps", str(args.steps)] + cfg)
    with open(out) as f:
        return check_source(kind, json.load(f), out)


def grid_strategies() -> List[str]:
    """fig13's trees: top-4 trees of every depth x verified tokens where the tree can reach its depth (V - 1 >=
    depth draft nodes) and has that many candidates."""
    out = []
    for dp in GRID_DEPTHS:
        for v in GRID_VERIFY:
            if v - 1 < dp:
                continue
            try:
                out.append(SpecStrategy(depth=dp, top_k=4, num_verify=v).name)
            except ConfigError:
                continue  # more draft nodes than the tree proposes
    return out


def _worker(args) -> int:
    """Runs one in-process measurement (train, seeds, rollout) and writes its JSON."""
    kind = args.worker
    base = load_config(args.config, list(args.overrides))
    apply_cpu_devices(specs.cpu_devices(base))  # before anything starts JAX
    payload: Dict[str, Any] = {"config": args.config, "overrides": list(args.overrides), "machine": None}
    with tempfile.TemporaryDirectory(prefix=f"tlt_figures_{kind}_") as tmp:
        if kind == "train":
            trainer = Trainer(base, os.path.join(tmp, "run"), log=lambda m: print(m, flush=True))
            trainer.run(progress=True)
            payload.update(train_source(trainer.workdir))
            payload["config"] = args.config
        elif kind == "seeds":
            runs = []
            plan = [(seed, mode) for seed in range(args.seeds) for mode in ("baseline", "tlt")]
            for seed, mode in tqdm(plan, desc="fig12 runs", unit="run", dynamic_ncols=True):
                cfg = load_config(args.config, list(args.overrides) + [
                    f"seed={seed}", f"rl.steps={args.steps}", f"tlt.enable={mode == 'tlt'}",
                    f"train.checkpoint_every={args.steps + 1}", "train.plots=False", "train.tensorboard=False"])
                trainer = Trainer(cfg, os.path.join(tmp, f"{mode}_{seed}"), log=lambda m: print(m, flush=True))
                hist = trainer.run(progress=False)
                runs.append({"mode": mode, "seed": seed, "reward": [h["reward_mean"] for h in hist],
                             "accuracy": [h["accuracy"] for h in hist]})
            payload.update(runs=runs, steps=args.steps)
        elif kind == "rollout":
            trainer = Trainer(base, os.path.join(tmp, "run"), log=lambda m: print(m, flush=True))
            if trainer.engine is None:
                raise SystemExit("fig14 needs the adaptive engine: the config has tlt.enable=False")
            trainer.engine.precompile(trainer.params, nnx.split(trainer.drafter)[1] if trainer.drafter else None)
            g = int(base.rl.group_size)
            prompts = [trainer.prompt_ids[i] for i in trainer.prompt_indices(0) for _ in range(g)]
            trainer.rollout(prompts, seed=12345, train_drafter=False)  # compiles what precompile left
            t0 = time.perf_counter()
            res = trainer.rollout(prompts, seed=777, train_drafter=False)
            payload.update(rollout_s=time.perf_counter() - t0, timeline=res.stats["timeline"],
                           sd_threshold=int(base.tlt.sd_threshold), replicas=len(trainer.engine.replicas),
                           tokens=int(sum(res.lengths)))
        else:
            raise SystemExit(f"unknown worker {kind!r}")
    payload["machine"] = machine_info()
    with open(args.json, "w") as f:
        jsonio.dump(payload, f)
    return 0


# ---------------------------------------------------------------------------------------------- command

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tlt-figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"figures to make: {', '.join(FIGURES)} or all")
    ap.add_argument("--list", action="store_true", help="list the figures and what each is drawn from")
    ap.add_argument("--out", default="figures", help="directory of NAME.json / NAME.png (default figures/)")
    ap.add_argument("--from", dest="source", default="",
                    help="read the measurement from this file (or training work dir) instead of running it")
    ap.add_argument("--quick", action="store_true", help="the tiny random model, a few minutes (tests)")
    ap.add_argument("--config", default="", help=f"workload (default {DEFAULT_CONFIG}; fig12: {SEEDS_CONFIG})")
    ap.add_argument("--seeds", type=int, default=2, help="fig12: seeds per mode")
    ap.add_argument("--steps", type=int, default=4, help="fig12: RL steps per run")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    args.overrides = config_overrides(ap, rest)
    if args.seeds < 1 or args.steps < 1:
        ap.error("need --seeds >= 1 and --steps >= 1")
    if args.worker:
        return _worker(args)
    if args.list:
        for f in FIGURES.values():
            print(f"{f.name:8} {f.title}  [from {SOURCES[f.source].what}]")
        return 0
    names = list(FIGURES) if args.names == ["all"] else args.names
    if not names:
        ap.error("name at least one figure (or all); --list lists them")
    bad = [n for n in names if n not in FIGURES]
    if bad:
        ap.error(f"unknown figure(s) {bad}; known: {', '.join(FIGURES)} (or all)")
    kinds = sorted({FIGURES[n].source for n in names})
    if args.source and len(kinds) > 1:
        ap.error(f"--from reads one measurement, but {names} are drawn from {kinds}: make them separately")
    os.makedirs(args.out, exist_ok=True)
    payloads = {}
    try:
        if args.source:
            payloads[kinds[0]] = read_source(kinds[0], args.source)
            origin = {kinds[0]: {"kind": kinds[0], "path": os.path.abspath(args.source)}}
        else:
            origin = {}
            work = tempfile.mkdtemp(prefix="tlt_figures_")
            try:
                for kind in tqdm(kinds, desc="measurements", unit="run", dynamic_ncols=True, disable=len(kinds) < 2):
                    sub = argparse.Namespace(**vars(args))
                    sub.config = args.config or (QUICK_CONFIG if args.quick else
                                                 SEEDS_CONFIG if kind == "seeds" else DEFAULT_CONFIG)
                    payloads[kind] = measure(kind, sub, work)
                    keep = os.path.join(args.out, "sources", f"{kind}.json")
                    write_json(keep, payloads[kind])  # the raw measurement, kept beside the figures
                    origin[kind] = {"kind": kind, "path": os.path.abspath(keep), "config": sub.config,
                                    "quick": bool(args.quick), "overrides": args.overrides}
            finally:
                shutil.rmtree(work, ignore_errors=True)
        for name in names:
            kind = FIGURES[name].source
            obj = make(name, payloads[kind], origin[kind])
            write_json(os.path.join(args.out, f"{name}.json"), obj)
            png = os.path.join(args.out, f"{name}.png")
            draw(obj, png)
            print(f"wrote {png}")
            table = markdown(obj)
            if table:
                print(table)
    except FigureError as e:
        print(f"tlt-figures: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
