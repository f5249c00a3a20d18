#!/usr/bin/env bash
# Runs N processes of one command on this machine, as one multi-process JAX job.
#
#   launch/local.sh N CMD [ARGS...]
#   launch/local.sh 2 flaxbert pretrain --config configs/pretrain.py:tiny --workdir runs/tiny2
#
# Each process gets FLAXBERT_COORDINATOR=127.0.0.1:PORT (a free port), FLAXBERT_NUM_PROCESSES=N
# and FLAXBERT_PROCESS_ID=i, which `flaxbert pretrain` / `flaxbert compile` read. With
# NVIDIA GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi) the GPUs are split evenly between the
# processes; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices per
# process. Output lines are prefixed with [i]. Waits for all; when one fails the others
# are stopped and its exit status is returned.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1
shift

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

gpus=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi
per=0
if [[ ${#gpus[@]} -gt 0 ]]; then
  if ((${#gpus[@]} % n)); then
    echo "$0: ${#gpus[@]} GPUs cannot be split evenly between $n processes" >&2
    exit 2
  fi
  per=$((${#gpus[@]} / n))
fi

declare -A live=()  # pid -> process index
stop_all() {
  for pid in "${!live[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

quiet='/\[Gloo\]/d; /peer ranks/d; /^[0-9[:space:]]*$/d'
for ((i = 0; i < n; i++)); do
  env_i=(FLAXBERT_COORDINATOR="127.0.0.1:$port" FLAXBERT_NUM_PROCESSES="$n" FLAXBERT_PROCESS_ID="$i")
  if ((per)); then
    env_i+=(CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${gpus[*]:i*per:per}")")
  fi
  # gloo (the CPU collectives) prints a "[Gloo] Rank R is connected to P peer ranks. ..."
  # line per rank, from several threads at once, so the lines arrive interleaved and broken
  # ("[Gloo] Rank 2 is connected to [Gloo] Rank 3 ...", then "3 peer ranks. ...", or a bare
  # "7"): every such piece, and any line of bare numbers, is dropped here (flaxbert's own
  # log lines all start with a time stamp).
  env "${env_i[@]}" "$@" > >(sed -u -e "$quiet" -e "s/^/[$i] /") \
    2> >(sed -u -e "$quiet" -e "s/^/[$i] /" >&2) &
  live[$!]=$i
done

status=0
while ((${#live[@]} > 0)); do
  for pid in "${!live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    set +e
    wait "$pid"
    rc=$?
    set -e
    i=${live[$pid]}
    unset "live[$pid]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "$0: process $i failed (exit $rc); stopping the others" >&2
      stop_all
    fi
  done
  sleep 0.2
done
wait  # the output filters
exit "$status"
