"""What every config-driven command shares: ``--config PATH`` plus ``--config.a.b=v`` overrides, the command's
own flags, and TltError reported as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from tlt_jax.app import specs
from tlt_jax.app.config import load_config, split_config_args
from tlt_jax.core.errors import TltError
from tlt_jax.parallel import multihost
from tlt_jax.parallel.mesh import apply_cpu_devices


def config_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[object, argparse.Namespace], int], argv: Optional[Sequence[str]] = None,
                default_config: Optional[str] = "smollm2_135m", distributed: bool = False,
                split_cpu: bool = True) -> int:
    """``distributed``: the command takes the multi-process flags (``parallel.multihost.add_arguments``) and joins
    the job's other processes before it starts. A process of a multi-process job that fails says why in one line
    and leaves at once (exit status 3) rather than wait for peers that will never answer. ``default_config`` None:
    ``--config`` is required. ``split_cpu``: a CPU host starts with ``mesh.cpu_devices`` devices."""
    argv = sys.argv[1:] if argv is None else argv
    joined = False
    try:
        path, overrides, rest = split_config_args(argv)
        ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(ap)
        if distributed:
            multihost.add_arguments(ap)
        args = ap.parse_args(rest)
        if path is None and default_config is None:
            ap.error("--config is required (e.g. --config configs/smollm2_135m.py)")
        config = load_config(path or default_config, overrides)
        if split_cpu:
            apply_cpu_devices(specs.cpu_devices(config))
        if distributed:
            joined = multihost.join_from_arguments(args, log=lambda m: print(m, flush=True))
        return run(config, args)
    except TltError as e:
        print(f"error: {e}", file=sys.stderr)
        if joined:
            _leave(2)
        return 2
    except Exception as e:  # noqa: BLE001 - a multi-process job must not hang in its peers' shutdown barrier
        if not joined:
            raise
        traceback.print_exc()
        print(f"error: {multihost.describe_failure(e)}", file=sys.stderr, flush=True)
        _leave(3)


def _leave(code: int) -> None:
    """Exits now, skipping jax.distributed's shutdown barrier (the peers may be gone or stuck)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
