#!/usr/bin/env bash
# Launch pretrain_ki.py under the DeepSpeed launcher, configured by environment variables.
#
#   CONFIG=launch/configs/models/tiny_gpt2.yaml launch/pretrain_ki.sh --train.train_steps 100 ...
#   launch/pretrain_ki.sh --config my_run.yaml --ki.enabled true --ki.teacher_path ckpt/teacher
#
# Arguments after the script name are passed unchanged to pretrain_ki.py (dotted overrides such as
# --parallel.tensor_parallel 2); CONFIG adds "--config $CONFIG" in front unless --config is given.
#
# Environment (defaults in brackets):
#   CONFIG          run config YAML; required unless --config is among the arguments
#   GPUS_PER_NODE   ranks per node [GPUs seen by nvidia-smi; on a machine without GPUs: CPU_RANKS]
#   CPU_RANKS       ranks when no GPU is usable; DS_ACCELERATOR=cpu and gloo are used then [2]
#   NNODES          nodes to use from the hostfile [all of them]
#   NODE_RANK       this node's index, only for launching on every node yourself (no ssh, see below)
#   HOSTFILE        MPI-style hostfile, one "hostname slots=N" line per node [none: this node only]
#   MASTER_ADDR     address of rank 0's node [DeepSpeed asks the first host of the hostfile]
#   MASTER_PORT     rendezvous port [29500]
#   LAUNCHER        DeepSpeed multi-node backend: pdsh, openmpi, mvapich, slurm ... [pdsh]
#   DEEPSPEED       the launcher executable [deepspeed]
#   PYTHON          interpreter used to ask torch whether CUDA works [python3]
#   OMP_NUM_THREADS CPU threads per rank [on CPU: cores / ranks]
#   DRY_RUN=1       print the resolved command and exit without running it
#
# Multi-node cluster run with a hostfile (the DeepSpeed way: start it once, on the first node; the launcher
# reaches the other nodes over passwordless ssh with pdsh, so the repository and the virtualenv must be at
# the same path on every node, e.g. a shared filesystem):
#
#   $ cat /shared/hostfile
#   node-001 slots=8
#   node-002 slots=8
#   node-003 slots=8
#   node-004 slots=8
#   $ HOSTFILE=/shared/hostfile NNODES=4 GPUS_PER_NODE=8 MASTER_ADDR=node-001 MASTER_PORT=29500 \
#       CONFIG=launch/configs/my_run.yaml launch/pretrain_ki.sh \
#       --parallel.tensor_parallel 8 --parallel.pipeline_parallel 2 --checkpoint.save /shared/ckpt/run1
#
#   32 ranks = tensor 8 x pipeline 2 x data 2. Under SLURM, set LAUNCHER=slurm instead of relying on ssh.
#   Without ssh between nodes, run the same command on every node with its NODE_RANK (0..NNODES-1) and an
#   explicit MASTER_ADDR; the script then passes --no_ssh --node_rank to DeepSpeed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
entry="${ENTRY:-$(dirname "$here")/pretrain_ki.py}"
deepspeed_bin="${DEEPSPEED:-deepspeed}"
python_bin="${PYTHON:-python3}"

die() {
    echo "pretrain_ki.sh: error: $*" >&2
    exit 2
}

has_config=0
for arg in "$@"; do
    case "$arg" in
        --config | --config=*) has_config=1 ;;
    esac
done
if [[ $has_config -eq 0 && -z "${CONFIG:-}" ]]; then
    die "no run config: set CONFIG=path/to/run.yaml or pass --config FILE"
fi
if [[ $has_config -eq 0 ]]; then
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: file not found"
    set -- --config "$CONFIG" "$@"
fi

# GPUs: nvidia-smi must list them and torch must be able to use them; otherwise DeepSpeed's CPU accelerator.
gpus=0
if [[ "${DS_ACCELERATOR:-}" != "cpu" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [[ "$gpus" -gt 0 ]] && ! "$python_bin" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1; then
        gpus=0
    fi
fi
if [[ "$gpus" -gt 0 ]]; then
    ranks="${GPUS_PER_NODE:-$gpus}"
else
    export DS_ACCELERATOR=cpu
    ranks="${GPUS_PER_NODE:-${CPU_RANKS:-2}}"
    [[ "$ranks" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE/CPU_RANKS must be a positive integer, got '$ranks'"
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cores="$(nproc 2>/dev/null || echo 1)"
        threads=$((cores / ranks))
        export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
    fi
fi
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$ranks'"

[[ "${NNODES:-1}" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '${NNODES}'"
[[ -z "${NODE_RANK:-}" || "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be an integer, got '${NODE_RANK}'"

cmd=("$deepspeed_bin" --num_gpus "$ranks" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: file not found"
    cmd+=(--hostfile "$HOSTFILE")
    [[ -n "${LAUNCHER:-}" ]] && cmd+=(--launcher "$LAUNCHER")
elif [[ "${NNODES:-1}" -gt 1 ]]; then
    die "NNODES=$NNODES needs HOSTFILE (one 'hostname slots=N' line per node)"
fi
[[ -n "${NNODES:-}" ]] && cmd+=(--num_nodes "$NNODES")
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
if [[ -n "${NODE_RANK:-}" && "${NNODES:-1}" -gt 1 ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NODE_RANK=$NODE_RANK (launch on every node, no ssh) needs MASTER_ADDR"
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
cmd+=("$entry" "$@")

printf 'pretrain_ki.sh: DS_ACCELERATOR=%s' "${DS_ACCELERATOR:-auto}"
printf ' %q' "${cmd[@]}"
printf '\n'
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi

# Signals: DeepSpeed's single-node launcher dies on SIGTERM without passing it on, which would orphan the
# ranks. So the job runs in its own process group (a terminal's Ctrl-C reaches only this script) and this
# script forwards SIGTERM/SIGINT to the ranks, the children of DeepSpeed's per-node launch.py: they finish
# the step, save a checkpoint and exit with 75 (train.exit_signal_handler). Multi-node runs over pdsh get the
# signal through DeepSpeed's runner, which stops the remote ranks without a save (signal them directly, as
# SLURM's scancel does, to save).
children_of() {
    local stat line rest state ppid
    for stat in /proc/[0-9]*/stat; do
        read -r line <"$stat" 2>/dev/null || continue
        rest="${line##*) }"
        read -r state ppid _ <<<"$rest"
        [[ "$ppid" == "$1" ]] && echo "${line%% *}"
    done
    return 0
}

forward() {
    local sig="$1" launcher rank ranks=()
    for launcher in $(children_of "$job"); do
        for rank in $(children_of "$launcher"); do
            ranks+=("$rank")
        done
    done
    if [[ ${#ranks[@]} -gt 0 && "${NNODES:-1}" -le 1 ]]; then
        echo "pretrain_ki.sh: SIG$sig: forwarding it to the ranks (${ranks[*]}); they save and exit" >&2
        kill -s "$sig" "${ranks[@]}" 2>/dev/null || true
    else
        echo "pretrain_ki.sh: SIG$sig: forwarding it to the DeepSpeed launcher" >&2
        kill -s "$sig" "$job" $(children_of "$job") 2>/dev/null || true
    fi
}

set -m
"${cmd[@]}" &
job=$!
set +m
trap 'forward TERM' TERM
trap 'forward INT' INT
while true; do
    rc=0
    wait "$job" || rc=$?
    kill -0 "$job" 2>/dev/null || break # wait returned because the job ended, not because of a signal
done
exit "$rc"
