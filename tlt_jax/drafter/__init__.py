"""Drafter training: the EAGLE loss, a jitted update step, checkpoints and the offline warm-up."""


def speculation_from_config(config, model):
    """(SpeculativeSpec, drafter or None) from the ``speculative`` and ``drafter`` config sections.

    The learned proposer needs a warmed drafter for this very target (``drafter.checkpoint``, or the
    warm-up's default directory); a missing or mismatched one is a CheckpointError that says how to make one.
    """
    from tlt_jax.drafter.io import load_drafter
    from tlt_jax.drafter.warmup import default_drafter_dir
    from tlt_jax.errors import CheckpointError
    from tlt_jax.rollout.speculative import SpeculativeSpec
    from tlt_jax.rollout.tree import SpecStrategy

    sp = config.speculative
    sspec = SpeculativeSpec(SpecStrategy.parse(sp.strategy), proposer=sp.proposer, ngram_max=int(sp.ngram_max),
                            ngram_min=int(sp.ngram_min))
    if sspec.proposer != "eagle":
        return sspec, None
    directory = default_drafter_dir(config)
    try:
        drafter, _ = load_drafter(directory, model)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Warm a drafter first (python -m tlt_jax.drafter.warmup --config "
                              f"<this config>) or use --config.speculative.proposer=ngram") from None
    return sspec, drafter
