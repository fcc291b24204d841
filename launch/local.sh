#!/usr/bin/env bash
# The main job (GRPO with TLT rollouts) on this machine, as one process or as several joined ones.
#
#   launch/local.sh CONFIG WORKDIR [--processes N] [--local-devices K] [--pin-cores] [--resume] [--config.a.b=v ...]
#
#   launch/local.sh configs/smollm2_135m.py runs/smollm2                      # one process, all devices
#   launch/local.sh configs/tiny.py runs/tiny --processes 2 --local-devices 2 # two processes, 2 CPU devices each
#   launch/local.sh configs/smollm2_135m.py runs/smollm2 --resume             # continue from the newest checkpoint
#   launch/local.sh configs/smollm2_135m.py runs/own --processes 2 --local-devices 1 --pin-cores
#                                       # one rollout replica per process, each on cores of its own
#
# Several processes on one machine behave like several hosts (jax.distributed over 127.0.0.1): the way to try a
# multi-host set-up before a pod or a cluster. --local-devices splits a CPU into that many XLA devices per
# process; --pin-cores gives each process its own share of the cores (tlt-launch --pin-cores). Metrics, samples
# and plots land in WORKDIR (written by process 0), checkpoints in WORKDIR/checkpoints.
# PYTHON picks the interpreter (default: python).
set -euo pipefail
usage="usage: launch/local.sh CONFIG WORKDIR [--processes N] [--local-devices K] [--pin-cores] [--resume] [--config.a.b=v ...]"
config="${1:?$usage}"
workdir="${2:?$usage}"
shift 2
processes=1
local_devices=""
pin=""
rest=()
while (($#)); do
  case "$1" in
    --processes) processes="${2:?$usage}"; shift 2 ;;
    --processes=*) processes="${1#*=}"; shift ;;
    --local-devices) local_devices="${2:?$usage}"; shift 2 ;;
    --local-devices=*) local_devices="${1#*=}"; shift ;;
    --pin-cores) pin="--pin-cores"; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
py="${PYTHON:-python}"
job=("$py" -m tlt_jax.cli.train --config "$config" --workdir "$workdir" "${rest[@]}")
if [[ "$processes" == 1 ]]; then
  exec "${job[@]}" ${local_devices:+--local-devices "$local_devices"}
fi
exec "$py" -m tlt_jax.cli.launch --processes "$processes" ${local_devices:+--local-devices "$local_devices"} $pin -- \
  "${job[@]}"
