"""One process of a tests/multiproc.py run: ``python -m tests.multiproc_worker '<json>'``.

The JSON holds coordinator, num_processes, process_id, local_devices, timeout_s, target ("module:function") and
args. The worker joins the others, calls ``function(args)`` and prints ``RESULT <json of the return value>``.
"""

import importlib
import json
import os
import sys
import traceback


def main(argv) -> int:
    spec = json.loads(argv[1])
    # Join before importing the target: its module may touch jax devices at import time.
    from tlt_jax.parallel import multihost

    print(f"multiproc worker: process {spec['process_id']} of {spec['num_processes']} joining {spec['coordinator']}",
          file=sys.stderr, flush=True)
    multihost.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"],
                         local_devices=spec.get("local_devices"), timeout_s=spec.get("timeout_s", 60))
    module_name, _, func_name = spec["target"].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(spec["args"])
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv)
    except BaseException:  # noqa: B902 - report anything, then leave at once
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        # A failed process leaves without jax.distributed's shutdown barrier, which would wait out the heartbeat
        # timeout for a peer that died; its peers see the failure through their own collectives or heartbeats.
        os._exit(code)
    sys.exit(0)
