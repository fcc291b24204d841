"""The one optimizer factory: AdamW after global-norm clipping, with an optional learning-rate schedule."""

from __future__ import annotations

import optax


def make_optimizer(lr: float, *, weight_decay: float = 0.0, clip: float = 1.0, warmup_steps: int = 0,
                   cosine_steps: int = 0) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip)`` then ``adamw`` (b1 0.9, b2 0.999).

    Schedule: with ``cosine_steps`` > 0, a linear warm-up over ``min(warmup_steps, cosine_steps // 2)`` (at
    least 1) steps and a cosine decay to lr / 10 at ``cosine_steps`` (the drafter's offline warm-up); else a
    linear warm-up over ``warmup_steps`` (if any) to a constant ``lr`` (the policy, the online drafter).
    """
    if cosine_steps > 0:
        warm = max(1, min(int(warmup_steps), int(cosine_steps) // 2))
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(int(cosine_steps), warm + 1),
                                                      end_value=lr * 0.1)
    elif warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, lr, int(warmup_steps))
    else:
        schedule = lr
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, b1=0.9, b2=0.999,
                                                                    weight_decay=weight_decay))
