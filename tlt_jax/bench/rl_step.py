"""RL step time of the baseline, TLT-Base and TLT, and the adaptive drafter against a frozen one, in one run.

    python -m tlt_jax.bench.rl_step [--json PATH] [--steps 3] [--adaptive-steps 10] [--config PATH]
        [--config.a.b=v ...]

Workload: the config's GRPO job (default ``configs/smollm2_135m.py``: SmolLM2-135M-Instruct, 4 prompts x 4
answers of at most 128 tokens, T = 0.7). Every mode trains from the same initial policy on the same prompts
with the same seeds, on this machine, one mode after the other (each in its own process: the device layout
``mesh.cpu_devices`` is fixed when JAX starts; the baseline, which has no replicas, gets the whole host as one
device, its fastest layout on a CPU; the TLT modes use the config's layout):

* ``baseline``: plain rollouts (``tlt.enable=False``), ``--steps`` RL steps;
* ``tlt_base``: the adaptive engine with the model-free arms (``tlt.ngram_arms``), ``--steps`` RL steps;
* ``tlt``: the adaptive engine with the warmed drafter, trained on idle replicas (spot training),
  ``--adaptive-steps`` RL steps;
* ``frozen``: the same with spot training off (the warmed drafter never moves), ``--adaptive-steps`` steps.

After every step of ``tlt`` and ``frozen`` the drafter is probed (``probe_accept``): chain-4 acceptance length on
one answer to each of the step's prompts by the current policy, same seed for both modes (the engine's own
``accept_len`` mixes in the chunks its bandit chose to decode plainly).

Each mode first compiles its programs and does one untimed rollout (the compile is not rollout time). Per mode
and step the JSON ``rows`` hold the rollout time, the step time (rollout + rewards + log-prob forward +
update), the acceptance length, the reward and the spot-training counters. ``summary``:
``rollout_speedup_tlt`` / ``step_speedup_tlt`` / ``rollout_speedup_tlt_base`` = baseline time / mode time
over the first ``--steps`` steps; ``accept_ratio_adaptive_vs_frozen`` = mean ``probe_accept`` of ``tlt`` over
its last three steps / the same of ``frozen`` (``rollout_accept_ratio_adaptive_vs_frozen``: the same with the
engine's ``accept_len``); ``accept_ratio_adaptive_vs_initial``: in the ``tlt`` run, the adapted drafter's probe
against the probe of the drafter it started from (``probe_initial``), on the same policy and prompts each
step. Last, with the adaptive run's final policy and drafter, the same rollout is timed with and without spot
training, alternating (``spot_overhead``: the rollout-time cost of training the drafter on idle replicas of a
shared device).

The warmed drafter comes from ``tlt-warmup --config <config>`` (required).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
from flax import nnx

from tlt_jax.app import build, specs
from tlt_jax.app.config import load_config
from tlt_jax.app.trainer import Trainer
from tlt_jax.bench.common import config_overrides, machine_info, print_table, write_json
from tlt_jax.core import jsonio
from tlt_jax.core.shapes import round_up
from tlt_jax.parallel.mesh import apply_cpu_devices
from tlt_jax.rollout.host import DrafterInput
from tlt_jax.rollout.speculative import SpeculativeSpec
from tlt_jax.rollout.tree import SpecStrategy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("baseline", "tlt_base", "tlt", "frozen")


def mode_overrides(mode: str):
    return {"baseline": ["tlt.enable=False", "mesh.cpu_devices=0"],
            "tlt_base": ["speculative.proposer=ngram"],
            "tlt": ["speculative.proposer=eagle", "tlt.spot_training=True"],
            "frozen": ["speculative.proposer=eagle", "tlt.spot_training=False"]}[mode]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--config", default="configs/smollm2_135m.py")
    ap.add_argument("--steps", type=int, default=3, help="RL steps of the baseline and TLT-Base (>= 1)")
    ap.add_argument("--adaptive-steps", type=int, default=10, help="RL steps of TLT and of the frozen drafter")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--overhead-reps", type=int, default=2)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one mode, write --json
    args, rest = ap.parse_known_args(argv)
    if args.steps < 1 or args.adaptive_steps < args.steps:
        ap.error("need --steps >= 1 and --adaptive-steps >= --steps")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes + ([args.worker] if args.worker else []) if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    overrides = config_overrides(ap, rest)
    if args.worker:
        return _worker(args, overrides)

    # Each mode runs in its own process, one after the other: a mode's device layout (mesh.cpu_devices) is fixed
    # when JAX starts, and the baseline (no replicas) gets the whole host as one device, its fastest layout.
    rows, extra = [], {}
    root = tempfile.mkdtemp(prefix="tlt_bench_rl_")
    try:
        for mode in modes:
            out = os.path.join(root, f"{mode}.json")
            cmd = [sys.executable, "-m", "tlt_jax.bench.rl_step", "--worker", mode, "--json", out, "--config",
                   args.config, "--steps", str(args.steps), "--adaptive-steps", str(args.adaptive_steps),
                   "--overhead-reps", str(args.overhead_reps)] + [f"--config.{o}" for o in overrides]
            rc = subprocess.call(cmd)
            if rc != 0:
                raise SystemExit(f"mode {mode} failed (exit status {rc})")
            with open(out) as f:
                part = json.load(f)
            rows.extend(part["rows"])
            extra.update(part["extra"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def total(mode, key, n):
        sel = [r[key] for r in rows if r["mode"] == mode and r["step"] <= n]
        return sum(sel) if len(sel) == n else float("nan")

    k = args.steps
    summary = {
        "rollout_speedup_tlt": total("baseline", "rollout_s", k) / total("tlt", "rollout_s", k),
        "step_speedup_tlt": total("baseline", "step_s", k) / total("tlt", "step_s", k),
        "rollout_speedup_tlt_base": total("baseline", "rollout_s", k) / total("tlt_base", "rollout_s", k),
    }
    last = [r for r in rows if r["step"] > args.adaptive_steps - 3]
    summary["accept_ratio_adaptive_vs_frozen"] = (
        _mean([r.get("probe_accept") for r in last if r["mode"] == "tlt"])
        / _mean([r.get("probe_accept") for r in last if r["mode"] == "frozen"]))
    # the same policy and rollouts: the adapted drafter against the one the tlt run started from
    summary["accept_ratio_adaptive_vs_initial"] = (
        _mean([r.get("probe_accept") for r in last if r["mode"] == "tlt"])
        / _mean([r.get("probe_initial") for r in last if r["mode"] == "tlt"]))
    summary["rollout_accept_ratio_adaptive_vs_frozen"] = (
        _mean([r["accept_len"] for r in last if r["mode"] == "tlt"])
        / _mean([r["accept_len"] for r in last if r["mode"] == "frozen"]))
    summary.update({k2: v for k2, v in extra.items() if not isinstance(v, dict)})
    print()
    for r in rows:
        r.setdefault("probe_accept", None)
        r.setdefault("probe_initial", None)
    print_table(rows, ["mode", "step", "rollout_s", "step_s", "accept_len", "probe_accept", "probe_initial",
                       "reward", "tokens",
                       "len_max", "spot_steps", "idle_device_s", "drafter_loss"])
    print()
    for key, v in summary.items():
        print(f"{key}: {v:.3f}")
    for key, v in extra.items():
        if isinstance(v, dict):
            print(f"{key}: {v}")
    write_json(args.json, {"machine": machine_info(), "config": args.config, "overrides": overrides,
                           "steps": args.steps, "adaptive_steps": args.adaptive_steps, "rows": rows,
                           "summary": summary, "extra": extra})
    return 0


def _worker(args, overrides) -> int:

    mode = args.worker
    steps = args.steps if mode in ("baseline", "tlt_base") else args.adaptive_steps
    base = ["tlt.adaptive=True", "train.plots=False", "train.tensorboard=False", f"train.checkpoint_every={steps + 1}"]
    config = load_config(args.config, base + overrides + mode_overrides(mode) + [f"rl.steps={steps}"])
    apply_cpu_devices(specs.cpu_devices(config))  # before anything starts JAX
    if mode in ("tlt", "frozen"):
        if not os.path.isdir(build.default_drafter_dir(config)):
            raise SystemExit(f"no warmed drafter in {build.default_drafter_dir(config)}: run "
                             f"tlt-warmup --config {args.config} first")
    print(f"\n=== {mode}: {steps} RL steps ({' '.join(mode_overrides(mode))})", flush=True)
    rows, extra = [], {}
    workdir = tempfile.mkdtemp(prefix=f"tlt_bench_{mode}_")
    try:
        trainer = Trainer(config, workdir, log=lambda m: print(m, flush=True))
        t0 = time.perf_counter()
        if trainer.engine is not None:
            trainer.engine.precompile(trainer.params, nnx.split(trainer.drafter)[1] if trainer.drafter else None)
        g = int(config.rl.group_size)
        widths = {}  # one untimed rollout per prompt width the steps will see (compiles its prefill)
        for s in range(steps):
            batch = [trainer.prompt_ids[i] for i in trainer.prompt_indices(s) for _ in range(g)]
            widths.setdefault(round_up(max(len(p) for p in batch), 8), batch)
        for batch in widths.values():
            trainer.rollout(batch, seed=12345, train_drafter=False)  # warm-up rollouts train nothing
        # the warmed drafter as the run starts: in the tlt mode it is probed beside the adapting one on the same
        # policy, prompts and seed each step (the frozen mode's own probe follows its own policy)
        initial = nnx.clone(trainer.drafter) if mode == "tlt" else None
        print(f"[bench] {mode}: compiled and warmed up in {time.perf_counter() - t0:.1f}s on "
              f"{len(jax.devices())} device(s)", flush=True)

        def on_step(m):
            row = {"mode": mode, "step": int(m["step"]), "rollout_s": float(m["time_rollout"]),
                   "step_s": float(m["step_time"]), "accept_len": float(m.get("accept_len", float("nan"))),
                   "reward": float(m["reward_mean"]), "tokens": int(m["rollout_tokens"]),
                   "len_max": float(m["len_max"]), "spot_steps": int(m.get("spot_steps", 0)),
                   "idle_device_s": float(m.get("idle_device_s", 0.0)),
                   "drafter_loss": float(m.get("drafter_loss", float("nan"))),
                   "arm_chunks": m.get("arm_chunks", {})}
            if mode in ("tlt", "frozen"):
                row["probe_accept"] = probe_accept(trainer, int(m["step"]) - 1)
            if initial is not None:
                row["probe_initial"] = probe_accept(trainer, int(m["step"]) - 1, initial)
            rows.append(row)
            print(f"[bench] {mode} step {row['step']}: rollout {row['rollout_s']:.1f}s, step {row['step_s']:.1f}s, "
                  f"accept {row['accept_len']:.2f}, probe {row.get('probe_accept', float('nan')):.2f}, reward "
                  f"{row['reward']:.3f}, spot steps {row['spot_steps']}", flush=True)

        trainer.run(progress=False, on_step=on_step)
        if mode == "tlt" and trainer.spot is not None and args.overhead_reps > 0:
            extra["spot_overhead"] = _spot_overhead(trainer, args.overhead_reps)
        if trainer.engine is not None:
            extra[f"pool_{mode}"] = trainer.engine.pool.stats()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with open(args.json, "w") as f:
        jsonio.dump({"rows": rows, "extra": extra}, f)
    return 0


def probe_accept(trainer, step: int, drafter=None) -> float:
    """A drafter's acceptance length on a fixed probe (``drafter`` None: the run's): one answer to each prompt of
    RL step ``step`` by the current policy, chain-4, the rollout's sampling settings, a fixed seed. The engine's
    own acceptance length mixes in the chunks its bandit decoded plainly; this measures the drafter alone, the
    same way for every mode and step."""
    drafter = trainer.drafter if drafter is None else drafter
    # policy (on the training mesh) and drafter (where the spot trainer averaged it) onto one local device
    probe = build.fixed_rollout(trainer.config, trainer.graphdef, trainer.model_cfg, trainer.spec,
                                speculation=SpeculativeSpec(SpecStrategy(depth=4)), drafter=drafter,
                                mesh=build.one_device_mesh())
    prompts = [trainer.prompt_ids[i] for i in trainer.prompt_indices(step)]
    out = probe.generate(trainer.params, prompts, seed=4242, drafter=DrafterInput(nnx.split(drafter)[1]))
    return out.accept_len


def _spot_overhead(trainer, reps: int) -> float:
    """Rollout time with spot training / without, same prompts, seed, policy and drafter (alternating)."""
    idx = trainer.prompt_indices(0)
    g = int(trainer.config.rl.group_size)
    prompts = [trainer.prompt_ids[i] for i in idx for _ in range(g)]
    spot = trainer.spot
    saved = (spot.params, spot.opt_state, spot.total_steps)
    times = {True: [], False: []}
    for _ in range(reps):
        for with_spot in (False, True):
            t0 = time.perf_counter()
            trainer.rollout(prompts, seed=777, train_drafter=with_spot)
            times[with_spot].append(time.perf_counter() - t0)
            spot.params, spot.opt_state, spot.total_steps = saved  # measuring must not train the drafter
    trainer.online.sync()
    ratio = sum(times[True]) / sum(times[False])
    print(f"[bench] spot training overhead: rollout {sum(times[True]) / reps:.2f}s with, "
          f"{sum(times[False]) / reps:.2f}s without ({ratio:.3f}x)", flush=True)
    return ratio


if __name__ == "__main__":
    raise SystemExit(main())
