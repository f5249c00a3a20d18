#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (a pod slice), as one JAX job.
#
#   launch/tpu_vm.sh TPU_NAME ZONE [--project P] -- CMD [ARGS...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b -- \
#       flaxbert pretrain --config configs/pretrain.py:base --workdir gs://my-bucket/runs/base
#
# JAX on a TPU VM finds the other workers by itself (`jax.distributed.initialize()` with no
# arguments; flaxbert calls it when it sees a multi-worker TPU, or when
# FLAXBERT_DISTRIBUTED=auto, which this script sets). The repository must be at the same
# path on every worker (REPO, default: this checkout's path), with flaxbert installed, e.g.
#   launch/tpu_vm.sh my-v4-32 us-central2-b -- pip install -e .
# Only worker 0 writes metrics; give a WORKDIR every worker can reach (a bucket or NFS)
# or read it from worker 0.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [gcloud flags...] -- COMMAND [ARGS...]" >&2
  exit 2
fi
name=$1
zone=$2
shift 2
gcloud_flags=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  gcloud_flags+=("$1")
  shift
done
if [[ $# -lt 2 ]]; then
  echo "$0: missing '-- COMMAND'" >&2
  exit 2
fi
shift  # the --
repo=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
printf -v cmd '%q ' "$@"

exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  "${gcloud_flags[@]}" \
  --command "cd $(printf '%q' "$repo") && FLAXBERT_DISTRIBUTED=auto $cmd"
