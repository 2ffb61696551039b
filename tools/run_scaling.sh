#!/usr/bin/env bash
# Tensor-parallel benchmark across several machines (DeepSpeed's multi-node launch).
#
#   tools/run_scaling.sh HOSTFILE IFACE RANKS_PER_NODE [run.py flags ...]
#
# HOSTFILE        DeepSpeed/MPI hostfile, one machine a line: `hostname slots=N` (N >= RANKS_PER_NODE).
#                 Run this on the first machine listed; it becomes rank 0 (MASTER_ADDR).
# IFACE           network interface the ranks talk over (e.g. eth0, ib0): its IPv4 address on this
#                 machine is MASTER_ADDR; gloo and oneCCL are told to use it on every machine.
# RANKS_PER_NODE  ranks started on each machine (e.g. 2: one per socket), each bound to its own
#                 cores (--bind_cores_to_rank).
# the rest        run.py flags, after `--benchmark --autotp`: -m MODEL --dtype bfloat16 ...
#
# Every machine needs the same checkout at the same path, the same Python environment, numactl,
# and passwordless ssh between them (the default launcher is pdsh; set LAUNCHER=openmpi, mpich,
# impi, slurm or mvapich to use another). MASTER_PORT (default 29500) must be open between them.
# The model is read on every machine: a shared folder, or --shard-model (each machine's local
# rank 0 writes the shard under --output-dir on its own disk). DRY_RUN=1 prints the command only.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: run_scaling.sh: $*" >&2; exit 2; }
[ $# -ge 3 ] || usage
hostfile=$1 iface=$2 ranks=$3
shift 3
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[ -f "$hostfile" ] || die "no such hostfile: $hostfile"
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || die "RANKS_PER_NODE must be a positive integer, got '$ranks'"
grep -Eq '^[[:space:]]*[^#[:space:]]' "$hostfile" || die "hostfile $hostfile lists no machine"
command -v deepspeed >/dev/null 2>&1 || die "deepspeed is not installed (pip install -r requirements.txt)"
command -v numactl >/dev/null 2>&1 || die "numactl is missing (needed by --bind_cores_to_rank)"
if command -v ip >/dev/null 2>&1; then
  addr=$(ip -4 -o addr show dev "$iface" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1 || true)
else
  addr=""
fi
[ -n "$addr" ] || die "network interface '$iface' has no IPv4 address here (see: ip -4 addr)"

# What every rank on every machine must see: DeepSpeed forwards the variables of this file.
env_file=$(mktemp "${TMPDIR:-/tmp}/llmbench-ds-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
{
  echo "DS_ACCELERATOR=cpu"
  echo "GLOO_SOCKET_IFNAME=$iface"
  echo "CCL_SOCKET_IFNAME=$iface"
  while IFS= read -r name; do
    printf '%s=%s\n' "$name" "${!name}"
  done < <(compgen -e | grep -E '^(HF_|TRANSFORMERS_|LLMBENCH_|KMP_|CCL_|FI_|MALLOC_CONF$|LD_PRELOAD$)' \
             | grep -vE '^(CCL_SOCKET_IFNAME)$' || true)
} > "$env_file"

cmd=(deepspeed --hostfile "$hostfile" --num_accelerators "$ranks" --bind_cores_to_rank
     --master_addr "$addr" --master_port "${MASTER_PORT:-29500}" --launcher "${LAUNCHER:-pdsh}"
     "$root/run.py" --benchmark --autotp "$@")
echo "run_scaling: $(wc -l < "$hostfile" | tr -d ' ') machine(s) in $hostfile, $ranks rank(s) each, over $iface ($addr)"
echo "run_scaling: forwarded to every rank: $(cut -d= -f1 "$env_file" | paste -sd' ')"
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
cd "$root"
DS_ACCELERATOR=cpu DS_ENV_FILE="$env_file" "${cmd[@]}"
