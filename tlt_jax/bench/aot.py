"""A config's programs compiled for an accelerator from this host, and a roofline model of their time on it.

    python -m tlt_jax.bench.aot --target tpu-v5e|tpu-v5p|h100 [--config configs/qwen2_5_7b.py]
        [--batches 1,8,32] [--verify 8,16,32,64] [--rows 8] [--answer-len N] [--layers N]
        [--programs decode,verify,chunk,logprob,train] [--json PATH] [--config.a.b=v ...]

Programs (:mod:`tlt_jax.app.aot`), each compiled by XLA:TPU on compile-only devices of the target's topology
(the ``tpu`` extra): a decode step and a verify step of V chained tokens at every batch of ``--batches`` on one
rollout replica (``tlt.replicas`` of the topology's chips, ``tlt.replica_tensor`` chips per model copy), the
baseline's decode chunk at the largest batch, and the log-prob forward and GRPO update of ``--rows`` rows over
every chip (``mesh.*``), with a cache / sequence of ``rollout.max_prompt_len`` + ``--answer-len`` tokens
(default ``rollout.max_new_tokens``). Reported per program: compiled bytes per chip (XLA's memory analysis),
FLOPs and bytes accessed per chip (XLA's cost analysis; the attention kernels declare theirs, at a full-length
cache) and a roofline time, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) with the chip's published figures.
The table "verify-V cost in decode steps" divides a verify step's roofline time by the decode step's at the same
batch: the projected cost curve of speculation on that chip.

Every time in the output is a MODEL (a roofline of XLA's counts), not a measurement. For ``h100`` nothing
compiles for a GPU here: the counts are XLA:TPU's for the same programs on a v5p topology of as many chips as
the node has GPUs (8), and only the peak figures are the H100's. A program whose bytes exceed the chip's memory
is reported with its bytes and the command exits with status 1. ``--layers N`` compiles N of the model's layers
and scales the per-layer part linearly from N and N / 2 layers (the layers are identical and unrolled): a model
again, for a faster run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List

import jax

from tlt_jax.app import aot
from tlt_jax.app.config import load_config
from tlt_jax.bench.common import config_overrides, print_table, write_json
from tlt_jax.core.errors import TltError
from tlt_jax.core.shapes import default_cache_len, round_up
from tlt_jax.parallel import chips

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GIB = 2.0 ** 30
PROGRAMS = ("decode", "verify", "chunk", "logprob", "train")
H100_COUNTS_FROM = "v5p:2x2x2"  # 8 chips, as many as the GPUs of one node
SCALED = ("flops", "bytes_accessed", "argument_gib_per_device", "output_gib_per_device", "temp_gib_per_device",
          "alias_gib_per_device", "peak_estimate_gib_per_device")


def _ints(text: str) -> List[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def roofline_s(rep: Dict, chip: chips.Chip) -> float:
    return max(rep.get("flops", 0.0) / chip.peak_flops, rep.get("bytes_accessed", 0.0) / chip.hbm_bandwidth)


def _devices(target: str):
    chip = chips.chip(target)
    if chip.platform == "tpu":
        return chips.compile_only_devices(target)
    if not chips.tpu_compiler_available():
        raise RuntimeError("the h100 projection takes its counts from XLA:TPU: pip install -e '.[tpu]'")
    return list(chips.tpu_topology(H100_COUNTS_FROM).devices)


def _compile_scaled(build, config, layers: int):
    """``build(config)`` at the config's depth, or (``layers``) at ``layers`` and ``layers // 2`` layers with the
    per-layer part extrapolated linearly to the full depth."""
    full = int(config.model.arch.num_layers)
    if not layers or layers >= full:
        return build(config)
    lo = max(1, layers // 2)
    reps = {}
    for n in (lo, layers):
        c = config.copy_and_resolve_references()
        c.model.arch.num_layers = n
        reps[n] = build(c)
    rep = dict(reps[layers])
    for k in SCALED:
        if k in rep:
            per_layer = (reps[layers][k] - reps[lo][k]) / (layers - lo)
            rep[k] = reps[layers][k] + per_layer * (full - layers)
    rep["extrapolated_from_layers"] = [lo, layers]
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help=f"one of {sorted(chips.CHIPS)}")
    ap.add_argument("--config", default="configs/qwen2_5_7b.py")
    ap.add_argument("--batches", type=_ints, default=[1, 8, 32], help="rows of the decode / verify steps")
    ap.add_argument("--verify", type=_ints, default=[8, 16, 32, 64], help="verified tokens per row")
    ap.add_argument("--rows", type=int, default=8, help="rows of the log-prob forward and the update")
    ap.add_argument("--answer-len", type=int, default=0, help="answer tokens (0: rollout.max_new_tokens)")
    ap.add_argument("--layers", type=int, default=0, help="compile this many layers and extrapolate (0: all)")
    ap.add_argument("--programs", default=",".join(PROGRAMS), help="which programs, comma-separated")
    ap.add_argument("--json", default="")
    args, rest = ap.parse_known_args(argv)
    programs = [p for p in args.programs.split(",") if p]
    if not programs or set(programs) - set(PROGRAMS):
        ap.error(f"--programs takes some of {','.join(PROGRAMS)}, got {args.programs!r}")
    if args.layers < 0 or args.layers == 1:
        ap.error("--layers must be 0 (every layer) or >= 2 (extrapolated from N and N / 2 layers)")
    if args.target not in chips.CHIPS:
        ap.error(f"unknown --target {args.target!r}; known: {', '.join(sorted(chips.CHIPS))}")
    config = load_config(args.config, config_overrides(ap, rest))
    chip = chips.chip(args.target)
    try:
        devices = _devices(args.target)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = int(config.rollout.max_prompt_len)
    answer = args.answer_len or int(config.rollout.max_new_tokens)
    cache_len = default_cache_len(round_up(prompt, 8), answer)
    counts = f"XLA:TPU on {H100_COUNTS_FROM}" if chip.platform != "tpu" else f"XLA:TPU on {chip.topology}"
    print(f"[aot] {config.name} for {chip.name} ({len(devices)} chips; counts from {counts}); cache {cache_len} "
          f"slots, train rows of {prompt} + {answer} tokens. Times below are a roofline MODEL, not measurements.",
          flush=True)

    jobs = []
    for b in args.batches:
        if "decode" in programs:
            jobs.append((f"decode_step b={b}", lambda c, b=b: aot.compile_step(c, devices, b, 1, cache_len)))
        for v in args.verify if "verify" in programs else ():
            jobs.append((f"verify V={v} b={b}", lambda c, b=b, v=v: aot.compile_step(c, devices, b, v, cache_len)))
    top = max(args.batches)
    if "chunk" in programs:
        jobs.append((f"decode_chunk b={top}", lambda c: aot.compile_decode_chunk(c, devices, top, cache_len)))
    if "logprob" in programs:
        jobs.append(("logprob", lambda c: aot.compile_logprob(c, devices, args.rows, prompt, answer)))
    if "train" in programs:
        jobs.append(("train_step", lambda c: aot.compile_train_step(c, devices, args.rows, prompt, answer)))

    reports, t0 = [], time.perf_counter()
    for i, (name, build) in enumerate(jobs):
        try:
            rep = _compile_scaled(build, config, args.layers)
        except TltError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # XLA:TPU refuses a program that does not fit the chip; its message has the bytes
            rep = {"program": name.split()[0], "name": name, "compile_error": str(e).splitlines()[0]}
        rep["name"] = name
        rep["fits"] = "compile_error" not in rep and aot.peak_bytes(rep) < chip.hbm_bytes
        rep["roofline_model_s"] = roofline_s(rep, chip) if "compile_error" not in rep else None
        reports.append(rep)
        if "compile_error" in rep:
            print(f"[aot] {i + 1}/{len(jobs)} {name}: does not fit: {rep['compile_error']}", flush=True)
            continue
        print(f"[aot] {i + 1}/{len(jobs)} {name}: {aot.peak_bytes(rep) / GIB:.2f} GiB per chip, "
              f"{rep.get('flops', 0):.3g} FLOPs, {rep.get('bytes_accessed', 0) / GIB:.2f} GiB accessed, roofline "
              f"model {1e3 * rep['roofline_model_s']:.3f} ms ({time.perf_counter() - t0:.0f} s)", flush=True)

    ok = [r for r in reports if "compile_error" not in r]
    rows = [{"program": r["name"], "GiB_per_chip": aot.peak_bytes(r) / GIB, "GFLOP": r.get("flops", 0.0) / 1e9,
             "GiB_accessed": r.get("bytes_accessed", 0.0) / GIB, "model_ms": 1e3 * r["roofline_model_s"],
             "fits": "yes" if r["fits"] else "NO"} for r in ok]
    print()
    if rows:
        print_table(rows, ["program", "GiB_per_chip", "GFLOP", "GiB_accessed", "model_ms", "fits"])
    by_name = {r["name"]: r for r in ok}
    curve = []
    for b in args.batches:
        dec = by_name.get(f"decode_step b={b}")
        row = {"batch": b}
        for v in args.verify:
            ver = by_name.get(f"verify V={v} b={b}")
            row[f"V={v}"] = (ver["roofline_model_s"] / max(dec["roofline_model_s"], 1e-30)
                             if ver is not None and dec is not None else None)
        curve.append(row)
    print(f"\nverify-V cost in decode steps on {chip.name} (roofline MODEL):")
    print_table(curve, ["batch"] + [f"V={v}" for v in args.verify])
    print(f"\nchip figures: {chip.source}")
    write_json(args.json, {"target": args.target, "chip": dataclasses.asdict(chip), "config": config.name,
                           "counts_from": counts, "cache_len": cache_len, "model_not_measurement": True,
                           "reports": reports, "verify_cost_in_decode_steps": curve})
    over = [r for r in reports if not r["fits"]]
    for r in over:
        need = r.get("compile_error") or f"needs {aot.peak_bytes(r) / GIB:.2f} GiB per chip"
        print(f"error: {r['name']} does not fit a {chip.name} ({chip.hbm_bytes / GIB:.2f} GiB): {need} (split the "
              f"model further: tlt.replica_tensor / mesh.tensor / mesh.fsdp, or fewer --rows)", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
