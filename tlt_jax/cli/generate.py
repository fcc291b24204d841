"""Answer sample prompts with a model from a config and report throughput.

    tlt-generate --config configs/smollm2_135m.py [--config.rollout.max_new_tokens=64] [--prompt "..."]

With ``--config.speculative.enable=True`` the answers come from the speculative rollout (same answers for
greedy decoding; the acceptance length is reported), with the warmed drafter or the n-gram proposer.
"""

from __future__ import annotations

import os
import sys
import time

from tlt_jax import jsonio

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _arguments(ap) -> None:
    ap.add_argument("--prompt", action="append", help="a user message (repeatable); default: job.prompts")
    ap.add_argument("--json", help="write answers and timings to this file")


def main(argv=None) -> int:
    from tlt_jax.cli.common import config_main

    return config_main("tlt-generate", __doc__, _arguments, run, argv)


def run(config, args) -> int:
    import jax
    import numpy as np

    from tlt_jax.models.tokenizer import chat_prompt_ids, load_tokenizer, stop_token_ids
    from tlt_jax.models.weights import model_from_config
    from tlt_jax.errors import ConfigError
    from tlt_jax.parallel import make_mesh
    from tlt_jax.rollout import RolloutSpec, SamplingParams, generate

    r = config.rollout
    mesh = make_mesh(config.mesh)
    t0 = time.perf_counter()
    print(f"[tlt] config {config.name}: loading {config.model.checkpoint or 'random model'} "
          f"on {len(jax.devices())} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}", flush=True)
    run_mesh = mesh if mesh.size > 1 else None
    cfg, model = model_from_config(config, run_mesh)
    t_load = time.perf_counter() - t0
    tok_path = config.model.tokenizer or config.model.checkpoint
    if not tok_path:
        raise ConfigError("tlt-generate needs a tokenizer: set model.checkpoint or model.tokenizer")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tok_path)
    t_tok = time.perf_counter() - t0
    messages = args.prompt or list(config.job.prompts)
    if not messages:
        raise ConfigError("no prompts: pass --prompt or set job.prompts")
    prompts = chat_prompt_ids(tokenizer, messages, config.job.system_prompt or None)
    too_long = [len(p) for p in prompts if len(p) > r.max_prompt_len]
    if too_long:
        raise ConfigError(f"a prompt has {max(too_long)} tokens > rollout.max_prompt_len={r.max_prompt_len}")
    spec = RolloutSpec(max_new_tokens=int(r.max_new_tokens),
                       stop_tokens=tuple(stop_token_ids(tokenizer, r.stop_strings)),
                       sampling=SamplingParams(float(r.temperature), int(r.top_k), float(r.top_p)),
                       chunk_steps=int(r.chunk_steps), attn_impl=config.model.attn_impl)
    print(f"[tlt] model {cfg.architecture} {cfg.num_params() / 1e6:.1f}M params loaded in {t_load:.1f}s, "
          f"tokenizer in {t_tok:.1f}s; answering {len(prompts)} prompts (compiling first)", flush=True)
    cache_len = int(r.cache_len) or None
    spec_result = []
    if config.speculative.enable:
        from tlt_jax.drafter import speculation_from_config
        from tlt_jax.rollout.speculative import generate_speculative

        if run_mesh is not None:
            raise ConfigError("the speculative rollout runs on one device for now: set mesh sizes to 1 or "
                              "--config.speculative.enable=False")
        sspec, drafter = speculation_from_config(config, model)
        print(f"[tlt] speculative rollout: {sspec.strategy.name} with the {sspec.proposer} proposer", flush=True)

        def answer():
            out = generate_speculative(model, prompts, spec, sspec, drafter, seed=int(config.seed),
                                       cache_len=cache_len)
            spec_result[:] = [out]
            return out.result
    else:
        def answer():
            return generate(model, prompts, spec, seed=int(config.seed), cache_len=cache_len, mesh=run_mesh)

    t0 = time.perf_counter()
    answer()  # compiles
    t_first = time.perf_counter() - t0
    res = answer()
    n_tok = int(np.sum(res.lengths))
    wall = res.prefill_s + res.decode_s
    for msg, toks, reason in zip(messages, res.tokens, res.finish_reasons):
        answer = tokenizer.decode(toks, skip_special_tokens=True).strip()
        print(f"\n>>> {msg}\n{answer}\n[{len(toks)} tokens, {reason}]")
    print(f"\n[tlt] {n_tok} tokens in {wall:.2f}s = {n_tok / wall:.1f} tokens/s "
          f"(prefill {res.prefill_s:.2f}s, decode {res.decode_s:.2f}s, {res.num_chunks} chunks; "
          f"first call incl. compile {t_first:.1f}s)")
    if spec_result:
        print(f"[tlt] acceptance length {spec_result[0].accept_len:.2f} tokens per target forward")
    if args.json:
        with open(args.json, "w") as f:
            jsonio.dump({"answers": [tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens],
                       "lengths": res.lengths.tolist(), "finish_reasons": res.finish_reasons,
                       "tokens_per_s": n_tok / wall, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
                       "accept_len": spec_result[0].accept_len if spec_result else None}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
