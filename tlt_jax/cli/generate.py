"""Answer sample prompts with a model from a config and report throughput.

    tlt-generate --config configs/smollm2_135m.py [--config.rollout.temperature=0] [--prompt "..."]

The answers are sampled as the ``rollout`` section says (``rollout.temperature=0``: greedy). With
``--config.speculative.enable=True`` they come from the speculative rollout (the same answers for greedy
decoding; the acceptance length is reported), with the warmed drafter or the n-gram proposer.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from tlt_jax.app import build, specs
from tlt_jax.cli.common import config_main
from tlt_jax.core import jsonio
from tlt_jax.core.errors import ConfigError
from tlt_jax.io.tokenizer import chat_prompt_ids
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.rollout.host import DrafterInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _arguments(ap) -> None:
    ap.add_argument("--prompt", action="append", help="a user message (repeatable); default: job.prompts")
    ap.add_argument("--json", help="write answers and timings to this file")


def main(argv=None) -> int:
    return config_main("tlt-generate", __doc__, _arguments, run, argv)


def run(config, args) -> int:
    r = config.rollout
    mesh = make_mesh(specs.mesh_sizes(config))
    t0 = time.perf_counter()
    print(f"[tlt] config {config.name}: loading {config.model.checkpoint or 'random model'} "
          f"on {len(jax.devices())} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}", flush=True)
    run_mesh = mesh if mesh.size > 1 else None
    cfg, model = build.model_from_config(config, run_mesh)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = build.tokenizer_from_config(config, "tlt-generate")
    t_tok = time.perf_counter() - t0
    messages = args.prompt or list(config.job.prompts)
    if not messages:
        raise ConfigError("no prompts: pass --prompt or set job.prompts")
    prompts = chat_prompt_ids(tokenizer, messages, config.job.system_prompt or None,
                              enable_thinking=bool(config.data.enable_thinking))
    too_long = [len(p) for p in prompts if len(p) > r.max_prompt_len]
    if too_long:
        raise ConfigError(f"a prompt has {max(too_long)} tokens > rollout.max_prompt_len={r.max_prompt_len}")
    spec = specs.rollout_spec(config, build.stop_tokens(config, tokenizer))
    print(f"[tlt] model {cfg.architecture} {cfg.num_params() / 1e6:.1f}M params loaded in {t_load:.1f}s, "
          f"tokenizer in {t_tok:.1f}s; answering {len(prompts)} prompts (compiling first)", flush=True)
    graphdef, params = nnx.split(model)
    speculation, drafter = None, None
    if config.speculative.enable:
        speculation, drafter = build.speculation_from_config(config, model)
        print(f"[tlt] speculative rollout: {speculation.strategy.name} with the {speculation.proposer} proposer",
              flush=True)
    rollout = build.fixed_rollout(config, graphdef, cfg, spec, speculation=speculation, drafter=drafter,
                                  mesh=run_mesh)
    drafter_input = DrafterInput(nnx.split(drafter)[1]) if drafter is not None else None

    def answer():
        return rollout.generate(params, prompts, seed=int(config.seed), drafter=drafter_input)

    t0 = time.perf_counter()
    answer()  # compiles
    t_first = time.perf_counter() - t0
    res = answer()
    n_tok = int(np.sum(res.lengths))
    wall = res.prefill_s + res.decode_s
    for msg, toks, reason in zip(messages, res.tokens, res.finish_reasons):
        text = tokenizer.decode(toks, skip_special_tokens=True).strip()
        print(f"\n>>> {msg}\n{text}\n[{len(toks)} tokens, {reason}]")
    print(f"\n[tlt] {n_tok} tokens in {wall:.2f}s = {n_tok / wall:.1f} tokens/s "
          f"(prefill {res.prefill_s:.2f}s, decode {res.decode_s:.2f}s, {res.num_chunks} chunks; "
          f"first call incl. compile {t_first:.1f}s)")
    if res.accept_len is not None:
        print(f"[tlt] acceptance length {res.accept_len:.2f} tokens per target forward")
    if args.json:
        with open(args.json, "w") as f:
            jsonio.dump({"answers": [tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens],
                         "lengths": res.lengths.tolist(), "finish_reasons": res.finish_reasons,
                         "tokens_per_s": n_tok / wall, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
                         "accept_len": res.accept_len}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
