"""Several JAX processes on 127.0.0.1 (gloo CPU collectives): host-level gathers, a global jitted computation over
every process's devices, and a dead process failing the run instead of hanging it.

The ``_target_*`` functions run inside the worker processes (tests/multiproc_worker.py imports this module there).
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multiproc import REPO_ROOT, ProcessesFailed, child_env, free_port, run_processes
from tlt_jax.parallel import multihost

HERE = __name__  # "tests.parallel.test_multihost", importable in the workers


# ---------------------------------------------------------------- worker targets


def _target_gather(args):
    import json

    import jax

    coordinator = json.loads(sys.argv[1])["coordinator"]  # from the worker's payload (for the re-initialise check)
    p = jax.process_index()
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) + 100 * p
    floats = np.array([0.5, -1.25], np.float32) * (p + 1)
    doubles = np.array([np.pi, 1e-300, 1.0 + 2.0 ** -50], np.float64) + p  # not representable in float32
    tree = {"a": np.int32(7 + p), "b": [np.full((2,), p, np.float32)]}
    multihost.barrier("gathered")
    errors = {}
    multihost.assert_same(np.array([1, 2, 3], np.int32), "a shared value")
    try:
        multihost.assert_same(np.array([p], np.int32), "the process index")
    except RuntimeError as e:
        errors["assert_same"] = str(e)
    # Already joined: the same arguments are a no-op, different ones an error.
    multihost.initialize(coordinator, 2, p)
    try:
        multihost.initialize(coordinator, 2, 1 - p)
    except RuntimeError as e:
        errors["reinit"] = str(e)
    return {
        "process_index": p, "process_count": jax.process_count(), "multiprocess": multihost.is_multiprocess(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "ints": multihost.allgather(ints).tolist(), "ints_dtype": str(multihost.allgather(ints).dtype),
        "floats": multihost.allgather(floats).tolist(), "doubles": multihost.allgather(doubles).tolist(),
        "doubles_dtype": str(multihost.allgather(doubles).dtype),
        "scalar": multihost.allgather(np.float32(p + 0.5)).tolist(),
        "agree": multihost.agree(np.array([10 + p, 20 + p], np.int32)).tolist(),
        "tree": jax.tree.map(lambda v: v.tolist(), multihost.allgather_tree(tree)),
        "errors": errors,
    }


def _target_global_sum(args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    p = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("x",), devices=jax.devices())
    rows = args["rows_per_device"] * jax.local_device_count()
    local = (np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 1000.0 * p)  # this process's rows
    sharding = NamedSharding(mesh, P("x"))
    x = jax.make_array_from_process_local_data(sharding, local)
    replicated = NamedSharding(mesh, P())
    total = jax.jit(jnp.sum, out_shardings=replicated)(x)
    col = jax.jit(lambda a: a.sum(axis=0), out_shardings=replicated)(x)
    full = jax.jit(lambda a: a * 2.0, out_shardings=replicated)(x)  # an all-gather of every process's rows
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(jnp.sum(a), "x"), mesh=mesh,
                                 in_specs=P("x"), out_specs=P()))(x)
    return {"shape": list(x.shape), "devices": len(x.sharding.device_set),
            "fully_addressable": bool(x.is_fully_addressable),
            "total": float(np.asarray(total.addressable_data(0))), "col": np.asarray(col.addressable_data(0)).tolist(),
            "full": np.asarray(full.addressable_data(0)).tolist(),
            "psum": np.asarray(psum.addressable_data(0)).tolist()}


def _target_die(args):
    import jax

    p = jax.process_index()
    if args["when"] == "after_first_collective":
        # The very collective the survivor repeats below, so its gloo connections are already up when the peer dies.
        multihost.allgather(np.array([-1], np.int32))
    if p == args["victim"]:
        os._exit(3)
    for i in range(1000):  # the survivor keeps gathering with the dead peer
        multihost.allgather(np.array([i], np.int32))
    return "the survivor should not get here"


def _target_hang(args):
    time.sleep(args["seconds"])
    return "woke up"


# ---------------------------------------------------------------- tests


@pytest.mark.multihost
def test_allgather_and_agree_over_two_processes():
    res = run_processes(f"{HERE}:_target_gather", 2, {}, local_devices=2)
    assert [r["process_index"] for r in res] == [0, 1]
    for r in res:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
        assert r["multiprocess"] is True
    expected_ints = [(np.arange(6).reshape(2, 3) + 100 * p).tolist() for p in range(2)]
    expected_doubles = [(np.array([np.pi, 1e-300, 1.0 + 2.0 ** -50]) + p).tolist() for p in range(2)]
    for r in res:
        assert r["ints"] == expected_ints and r["ints_dtype"] == "int32"
        assert r["floats"] == [[0.5, -1.25], [1.0, -2.5]]
        assert r["doubles"] == expected_doubles and r["doubles_dtype"] == "float64"  # bit for bit, no x64 needed
        assert r["scalar"] == [0.5, 1.5]
        assert r["agree"] == [10, 20]  # process 0's value everywhere
        assert r["tree"] == {"a": [7, 8], "b": [[[0.0, 0.0], [1.0, 1.0]]]}
        assert "the process index" in r["errors"]["assert_same"]
        assert "already initialised" in r["errors"]["reinit"]
    same = ("ints", "floats", "doubles", "scalar", "agree", "tree")
    assert [res[0][k] for k in same] == [res[1][k] for k in same]


@pytest.mark.multihost
def test_global_jit_over_every_process_devices():
    rows_per_device = 2
    res = run_processes(f"{HERE}:_target_global_sum", 2, {"rows_per_device": rows_per_device}, local_devices=2)
    local = [np.arange(12, dtype=np.float32).reshape(4, 3) + 1000.0 * p for p in range(2)]
    glob = np.concatenate(local)  # process 0's rows first: jax.devices() lists process 0's devices first
    for r in res:
        assert r["shape"] == [8, 3] and r["devices"] == 4 and r["fully_addressable"] is False
        assert r["total"] == float(glob.sum())
        assert r["col"] == glob.sum(axis=0).tolist()
        assert r["full"] == (2 * glob).tolist()
        assert r["psum"] == float(glob.sum())
    assert res[0] == res[1]


@pytest.mark.multihost
@pytest.mark.parametrize("victim,when", [(1, "after_first_collective"), (1, "before_first_collective"),
                                         (0, "after_first_collective")],
                         ids=["worker_dies_mid_run", "worker_dies_before_any_collective", "coordinator_dies"])
def test_dead_process_fails_the_run_instead_of_hanging(victim, when):
    # With its gloo connections up, the survivor's next collective usually fails at once (connection closed by
    # peer). Otherwise (no collective yet; rarely also mid-run) gloo waits for the peer, and the coordination
    # service's heartbeat timeout (init_timeout_s=10) aborts the survivor. Either way: an error, not a hang.
    t0 = time.monotonic()
    with pytest.raises(ProcessesFailed) as info:
        # A long grace period: the survivor must end on its own (collective error, or the heartbeat timeout).
        run_processes(f"{HERE}:_target_die", 2, {"victim": victim, "when": when}, local_devices=2, timeout_s=90,
                      grace_s=60, init_timeout_s=10)
    elapsed = time.monotonic() - t0
    outcomes = info.value.outcomes
    dead, survivor = outcomes[victim], outcomes[1 - victim]
    assert dead.returncode == 3 and not dead.killed
    assert not survivor.killed and survivor.returncode != 0, survivor.describe()
    assert "the survivor should not get here" not in survivor.stdout
    head = str(info.value).splitlines()[0]  # the failures, in the order they happened
    assert head.startswith(f"{HERE}:_target_die: process") and f"process {victim} exited with code 3" in head
    assert elapsed < 45, elapsed


@pytest.mark.multihost
def test_launcher_kills_a_hung_run():
    t0 = time.monotonic()
    with pytest.raises(ProcessesFailed, match="timed out after 8s") as info:
        run_processes(f"{HERE}:_target_hang", 2, {"seconds": 120}, local_devices=1, timeout_s=8)
    assert time.monotonic() - t0 < 20
    assert all(o.killed for o in info.value.outcomes)


@pytest.mark.multihost
def test_missing_coordinator_is_a_clear_error():
    code = (f"from tlt_jax.parallel import multihost\n"
            f"multihost.initialize('127.0.0.1:{free_port()}', 2, 1, local_devices=1, timeout_s=2)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=child_env(1), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "TimeoutError: no JAX coordinator (process 0) listening at 127.0.0.1:" in r.stderr
    assert time.monotonic() - t0 < 30


def test_single_process_helpers():
    x = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    g = multihost.allgather(x)
    assert g.shape == (1, 2, 3) and g.dtype == np.float64 and np.array_equal(g[0], x)
    assert multihost.allgather(np.int32(5)).tolist() == [5]
    assert np.array_equal(multihost.agree(x), x)
    t = multihost.allgather_tree({"a": np.zeros(2, np.int32), "b": (np.float32(1.0),)})
    assert t["a"].shape == (1, 2) and t["b"][0].tolist() == [1.0]
    multihost.assert_same(x, "x")
    multihost.barrier("alone")
    assert not multihost.is_multiprocess()


def test_core_sets_give_each_process_its_own_cores():
    assert multihost.core_sets(2, [0, 1]) == [[0], [1]]
    assert multihost.core_sets(2, [3, 0, 1, 2, 4]) == [[0, 1], [2, 3]]  # the odd core goes unused
    assert multihost.core_sets(1) == [sorted(os.sched_getaffinity(0))]
    with pytest.raises(ValueError, match="--pin-cores: 3 processes cannot each own a core of the 2"):
        multihost.core_sets(3, [0, 1], what="--pin-cores")
