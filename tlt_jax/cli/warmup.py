"""Warm a drafter for a config's target offline, by self-distillation (what it does: ``tlt_jax.drafter.warmup``).

    tlt-warmup --config configs/smollm2_135m.py [--out DIR] [--fresh-data] [--config.a.b=v ...]

The drafter goes to ``--out``, or ``drafter.checkpoint``, or ``<cache dir>/drafters/<config name>`` (where the
other commands look for it).
"""

from __future__ import annotations

import os
import sys

from tlt_jax.app import build, specs
from tlt_jax.cli.common import config_main
from tlt_jax.core.errors import ConfigError
from tlt_jax.drafter.warmup import warm_up_drafter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _arguments(ap) -> None:
    ap.add_argument("--out", default="", help="drafter checkpoint directory (default: see above)")
    ap.add_argument("--fresh-data", action="store_true", help="regenerate the self-distillation data")


def run(config, args) -> int:
    if not config.model.checkpoint:
        raise ConfigError("drafter warm-up needs a real target (model.checkpoint) and its tokenizer")
    out = args.out or build.default_drafter_dir(config)
    print(f"[warmup] config {config.name}; drafter -> {out}", flush=True)
    _, model = build.model_from_config(config)
    tokenizer = build.tokenizer_from_config(config, "the drafter warm-up")
    warm_up_drafter(model, tokenizer, specs.warmup_spec(config), out=out,
                    stop_tokens=build.stop_tokens(config, tokenizer), system=config.job.system_prompt or None,
                    data_key=[config.name, config.model.checkpoint], fresh_data=args.fresh_data,
                    log=lambda m: print(m, flush=True))
    return 0


def main(argv=None) -> int:
    return config_main("tlt-warmup", __doc__, _arguments, run, argv, default_config=None, split_cpu=False)


if __name__ == "__main__":
    sys.exit(main())
