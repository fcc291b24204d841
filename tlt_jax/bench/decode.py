"""Plain greedy decoding throughput: tlt_jax versus transformers' PyTorch ``generate``, same run.

    python -m tlt_jax.bench.decode [--json PATH] [--batches 1,8,32] [--new-tokens 128]

SmolLM2-135M-Instruct (embedded GGUF, float32), chat prompts, greedy, exactly ``--new-tokens`` new tokens
per row (EOS ignored on both sides), both after a warm-up call. Each side runs ``--repeats`` times, the two
sides alternating, and the median times are compared (a shared host's speed drifts; alternating exposes both
sides to the same drift). ``same_answer`` is the share of rows whose greedy answer (up to its EOS) is the
same on both sides. Needs the test extra (torch, accelerate).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from tlt_jax.bench.common import machine_info, print_table, questions, write_json
from tlt_jax.io.tokenizer import chat_prompt_ids, load_tokenizer
from tlt_jax.io.weights import embedded_gguf_path, load_gguf
from tlt_jax.rollout.decode import RolloutSpec, pad_prompts
from tlt_jax.rollout.host import generate

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (alternating); medians compared")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    import torch  # the PyTorch reference: the test extra, not a runtime dependency
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = embedded_gguf_path()
    print(f"loading SmolLM2-135M-Instruct twice (ours and transformers') from {gguf}", flush=True)
    cfg, model = load_gguf(gguf)
    tokenizer = load_tokenizer(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                          dtype=torch.float32).eval()
    n = args.new_tokens
    spec = RolloutSpec(max_new_tokens=n, stop_tokens=(), chunk_steps=32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = chat_prompt_ids(tokenizer, questions(b))
        left, valid = pad_prompts(prompts, pad_id=pad, side="left", multiple=1)  # as generate expects
        width = left.shape[1]
        ids, mask = torch.from_numpy(left).long(), torch.from_numpy(valid).long()

        def run_hf(new):
            with torch.no_grad():
                return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=pad)

        print(f"batch {b}: warm-up", flush=True)
        generate(model, prompts, spec)  # compiles
        run_hf(4)
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours = generate(model, prompts, spec)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = run_hf(n)
            t_hf.append(time.perf_counter() - t0)
        assert out.shape[1] - width == n and all(len(t) == n for t in ours.tokens)
        hf_tokens = out[:, width:].numpy()
        # generate's min_new_tokens forbids EOS, so compare each row's answer up to our first EOS.
        eos = tokenizer.eos_token_id
        same = []
        for i in range(b):
            mine = list(ours.tokens[i])
            cut = mine.index(eos) if eos in mine else n
            same.append(mine[:cut] == hf_tokens[i, :cut].tolist())
        agree = float(np.mean(same))
        m_ours, m_hf = float(np.median(t_ours)), float(np.median(t_hf))
        row = {"batch": b, "tlt_tok_s": b * n / m_ours, "hf_tok_s": b * n / m_hf,
               "ratio": m_hf / m_ours, "tlt_s": m_ours, "hf_s": m_hf, "tlt_runs_s": t_ours, "hf_runs_s": t_hf,
               "tlt_prefill_s": ours.prefill_s,
               "prompt_width": width, "same_answer": agree}
        rows.append(row)
        print(f"batch {b}: tlt {row['tlt_tok_s']:.1f} tok/s, transformers {row['hf_tok_s']:.1f} tok/s, "
              f"ratio {row['ratio']:.2f}", flush=True)
    print()
    print_table(rows, ["batch", "tlt_tok_s", "hf_tok_s", "ratio", "same_answer"])
    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    write_json(args.json, {"benchmark": "decode", "new_tokens": n, "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
