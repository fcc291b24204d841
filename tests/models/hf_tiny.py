"""Tiny random Llama / Qwen2 / Qwen3 checkpoints written with transformers, for parity tests."""

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
    elif arch == "qwen3":  # per-head q/k norms, no qkv bias, head_dim (24) not hidden / heads (16)
        cfg = transformers.Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=24,
                                       **common)
        model = transformers.Qwen3ForCausalLM(cfg)
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


def make_stopping_checkpoint(path, stop_id: int, *, vocab_size: int = 49152, strength: float = 10.0,
                             seed: int = 0):
    """A tiny random Llama (the embedded tokenizer's vocabulary) whose answers end at ``stop_id`` after spread-out
    lengths, whatever the prompt: the layers add nothing to the residual stream (zero output projections), so the
    next token depends on the current one only; the final norm keeps two hidden dimensions, and the stop token's
    logit is ``strength`` times the first, so some tokens are likely to be followed by a stop and most are not."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[:2] = 1.0
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[stop_id].zero_()
        model.lm_head.weight[stop_id, 0] = strength
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()
