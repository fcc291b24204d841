"""Tiny random Llama / Qwen2 checkpoints written with transformers, for parity tests."""

import torch
import transformers


def make_tiny_checkpoint(path, arch: str, *, tie: bool, seed: int = 0, llama3_rope: bool = False):
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie)
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 5000.0}
        if llama3_rope:
            rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Larger weights than the default init so logits are spread out (no near-ties in greedy tests).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 1.0 / p.shape[-1] ** 0.5))
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()
