#!/usr/bin/env bash
# The main job on a Cloud TPU pod slice: every worker (host) runs the same command, and jax.distributed finds the
# others by itself (--distributed). Run from your workstation:
#
#   launch/tpu_pod.sh TPU_NAME ZONE install                                  # once: venv + tlt_jax on every worker
#   launch/tpu_pod.sh TPU_NAME ZONE run CONFIG WORKDIR [--resume] [--config.a.b=v ...]
#   launch/tpu_pod.sh TPU_NAME ZONE run configs/qwen2_5_7b.py /mnt/shared/runs/q7 --config.mesh.fsdp=-1
#
# Environment: REPO (where this repository is on the workers, default ~/tlt_jax; copy or clone it there first),
# PROJECT (gcloud project, optional), DRY_RUN=1 (print the gcloud command instead of running it).
# WORKDIR must be one directory that every worker sees (a Filestore/NFS mount, or a bucket mounted with gcsfuse):
# every process writes its shards of each checkpoint there, and process 0 writes metrics.jsonl, samples and plots.
# A worker that dies makes the others stop with an error within --dist-timeout seconds (default 300); start the
# same command with --resume to continue from the newest checkpoint.
set -euo pipefail
usage="usage: launch/tpu_pod.sh TPU_NAME ZONE install | run CONFIG WORKDIR [--resume] [--config.a.b=v ...]"
tpu="${1:?$usage}"
zone="${2:?$usage}"
action="${3:?$usage}"
shift 3
repo="${REPO:-~/tlt_jax}"
gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project "$PROJECT")
case "$action" in
  install)
    remote="cd $repo && python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'"
    ;;
  run)
    config="${1:?$usage}"
    workdir="${2:?$usage}"
    shift 2
    extra=""
    for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
    remote="cd $repo && HF_HUB_OFFLINE=\${HF_HUB_OFFLINE:-1} .venv/bin/python -m tlt_jax.cli.train --distributed"
    remote+=" --no-progress --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")$extra"
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' gcloud "${gcloud_args[@]}" --command "$remote"
  echo
  exit 0
fi
exec gcloud "${gcloud_args[@]}" --command "$remote"
