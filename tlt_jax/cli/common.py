"""What every config-driven command shares: ``--config PATH`` plus ``--config.a.b=v`` overrides, the command's
own flags, and TltError reported as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


def config_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[object, argparse.Namespace], int], argv: Optional[Sequence[str]] = None,
                default_config: str = "smollm2_135m") -> int:
    from tlt_jax.config import load_config, split_config_args
    from tlt_jax.errors import TltError

    argv = sys.argv[1:] if argv is None else argv
    try:
        path, overrides, rest = split_config_args(argv)
        ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(ap)
        args = ap.parse_args(rest)
        config = load_config(path or default_config, overrides)
        from tlt_jax.parallel.mesh import apply_cpu_devices

        apply_cpu_devices(config)
        return run(config, args)
    except TltError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
