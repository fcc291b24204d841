"""Export the warmed (or RL-trained) drafter in the EAGLE-1 layout that serving engines load next to the target.

    tlt-export-drafter --config configs/smollm2_135m.py [--drafter DIR] --out DIR [--config.a.b=v ...]

``--drafter``: a drafter checkpoint directory (default: ``drafter.checkpoint``, else where ``tlt-warmup`` saves
for this config). The target is the config's model (``model.checkpoint``). What is written:
:mod:`tlt_jax.io.eagle`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from tlt_jax.app import build
from tlt_jax.cli.common import config_main
from tlt_jax.io.drafter import load_drafter
from tlt_jax.io.eagle import export_eagle


def _arguments(ap) -> None:
    ap.add_argument("--drafter", default="", help="drafter checkpoint directory (default: the config's)")
    ap.add_argument("--out", required=True, help="directory to write the EAGLE drafter to")


def run(config, args) -> int:
    _, model = build.model_from_config(config, None)
    directory = os.path.abspath(os.path.expanduser(args.drafter)) if args.drafter else build.default_drafter_dir(
        config)
    drafter, _ = load_drafter(directory, model)
    files = export_eagle(args.out, drafter, model)
    for f in files:
        print(f"wrote {f} ({os.path.getsize(f) / 2 ** 20:.1f} MiB)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return config_main("tlt-export-drafter", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
