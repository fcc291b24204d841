"""Reading and writing: weights (safetensors, GGUF), tokenizers, orbax checkpoints, drafter checkpoints."""
