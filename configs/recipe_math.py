"""Recipe: GRPO on boxed-answer competition maths (MATH style: a problem, and a worked solution whose last
\\boxed{} is the answer) with Qwen3-1.7B, sized for one TPU v5e-8 slice or one 8-GPU node, evaluated on MATH-500.

Data: the hub's ``DigitalLearningGmbH/MATH-lighteval`` (split ``train``, fields ``problem`` and ``solution``) for
training, ``HuggingFaceH4/MATH-500`` (split ``test``, fields ``problem`` and ``answer``) for evaluation; or local
files with the same fields. DAPO-style data (a chat-message prompt, the answer under ``reward_model``):

    --config.data.source=BytedTsinghua-SIA/DAPO-Math-17k --config.data.question_field=prompt
    --config.data.answer_field=reward_model.ground_truth --config.data.answer_format=raw

Weights: ``model.checkpoint`` names the hub model; point it at a local safetensors directory offline.
"""

from configs.recipe_gsm8k import get_config as gsm8k_config


def get_config():
    c = gsm8k_config()  # the same model, optimisation, replicas and evaluation schedule
    c.name = "recipe_math"
    c.data.source = "DigitalLearningGmbH/MATH-lighteval"
    c.data.subset = ""
    c.data.split = "train"
    c.data.question_field = "problem"
    c.data.answer_field = "solution"
    c.data.answer_format = "boxed"  # the gold answer is the solution's last \boxed{}
    c.eval.source = "HuggingFaceH4/MATH-500"
    c.eval.split = "test"
    c.eval.question_field = "problem"
    c.eval.answer_field = "answer"
    c.eval.answer_format = "raw"  # MATH-500 gives the final answer itself
    c.eval.limit = 0  # all 500
    # Answers: competition solutions run long, with a real tail; 3072 new tokens.
    c.rollout.max_prompt_len = 512
    c.rollout.max_new_tokens = 3072
    # 16 prompts x 8 answers = 128 rows per step, 8 rollout replicas of 16 rows: the bf16 weights (3.2 GiB) and
    # a KV cache of 16 x 3584 slots (6.1 GiB; tlt-inspect) per replica, next to the FSDP shard of the policy and
    # its optimizer state, fit a 16 GiB v5e chip
    c.rl.prompts_per_step = 16
    c.rl.minibatches = 8
    return c
