#!/usr/bin/env bash
# Run a job on this machine: launch/local.sh CONFIG [--config.a.b=v ...]
#   launch/local.sh configs/smollm2_135m.py --config.rollout.max_new_tokens=64
# Multi-host launchers (TPU pod slices, SLURM GPU clusters) come with the scale-out work.
set -euo pipefail
config="${1:?usage: launch/local.sh CONFIG [--config.a.b=v ...]}"
shift
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec tlt-generate --config "$config" "$@"
