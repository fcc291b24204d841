"""Recipe: GRPO on GSM8K-style data (a question, and a worked answer ending in '#### <number>') with Qwen3-1.7B,
sized for one TPU v5e-8 slice or one 8-GPU node, evaluated on the held-out test split.

Data: the hub's ``openai/gsm8k`` (subset ``main``: splits ``train`` and ``test``, fields ``question`` and
``answer``), from the network or a local hub cache; or local JSON lines with the same two fields:

    --config.data.source=/data/gsm8k/train.jsonl --config.eval.source=/data/gsm8k/test.jsonl

Weights: ``model.checkpoint`` names the hub model; point it at a local safetensors directory offline.
"""

from tlt_jax.app.config import qwen3_config


def get_config():
    c = qwen3_config("recipe_gsm8k", "Qwen/Qwen3-1.7B", hidden_size=2048, intermediate_size=6144, num_layers=28,
                     num_heads=16, num_kv_heads=8, tie_embeddings=True)
    c.data.source = "openai/gsm8k"
    c.data.subset = "main"
    c.data.split = "train"
    c.data.question_field = "question"
    c.data.answer_field = "answer"
    c.data.answer_format = "gsm8k"  # the gold answer is the number after '####'
    c.data.enable_thinking = False  # short worked answers; True lets Qwen3 think first (raise max_new_tokens)
    c.eval.split = "test"  # 1319 problems; eval.limit keeps the first 512
    c.eval.limit = 512
    c.eval.samples = 4
    c.eval.every = 25
    c.eval.at_start = True
    # Answers: worked solutions of a few hundred tokens; a 1024-token cap leaves room for the tail.
    c.rollout.max_prompt_len = 384
    c.rollout.max_new_tokens = 1024
    c.rollout.chunk_steps = 64
    c.rollout.temperature = 1.0
    # 32 prompts x 8 answers = 256 rows per step, 8 rollout replicas (one per chip or GPU) of 32 rows: the bf16
    # weights (3.2 GiB) and a KV cache of 32 x 1408 slots (4.8 GiB; tlt-inspect) per replica, next to the
    # FSDP shard of the policy and its optimizer state, fit a 16 GiB v5e chip
    c.rl.steps = 300
    c.rl.prompts_per_step = 32
    c.rl.group_size = 8
    c.rl.minibatches = 4
    c.rl.lr = 1e-6
    c.rl.warmup_steps = 10
    c.rl.format_weight = 0.1
    c.rl.prompt_multiple = 64
    c.tlt.replicas = 8
    c.tlt.sd_threshold = 16
    c.train.checkpoint_every = 25
    c.train.keep_checkpoints = 3
    return c
