#!/usr/bin/env bash
# vae-scale under plain torchrun, with elastic restarts: when a worker dies (a crash, an OOM kill, a lost
# node), torchrun stops the others and starts the whole group again, up to MAX_RESTARTS times, and the
# restarted trainer resumes from the newest complete checkpoint of its run folder (checkpoint.resume=auto).
# Work since that checkpoint is redone, so checkpoint.every bounds what a failure costs.
#
#   launch/torchrun.sh --config demo data.train=synthetic                 # this machine, 2 CPU processes
#   NPROC_PER_NODE=8 launch/torchrun.sh --config sd-f8 data.train=...
#   # several nodes: the same line on every node, with the same endpoint (a port free on HOST)
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=head-node:29400 launch/torchrun.sh --config sd-f8 ...
#
# Environment (all optional):
#   NNODES          nodes; MIN:MAX (e.g. 2:4) lets nodes join and leave between restarts     (default 1)
#   NPROC_PER_NODE  processes per node, one per GPU                                           (default 2)
#   MAX_RESTARTS    group restarts before torchrun gives up                                   (default 3)
#   RDZV_ENDPOINT   HOST:PORT of the c10d rendezvous; without it, and on one node only, torchrun runs
#                   --standalone (its own rendezvous on a free local port)
#   RDZV_ID         names the rendezvous, the same on every node of one job                  (default vae-scale)
#   OMP_NUM_THREADS CPU threads per process        (default: this machine's cores / NPROC_PER_NODE)
#   TORCHRUN        the torchrun executable                                                   (default torchrun)
# Without a GPU the processes run on the CPU and talk over gloo; with GPUs, over NCCL.
set -euo pipefail

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MAX_RESTARTS=${MAX_RESTARTS:-3}
cores=$(nproc)
threads=$((cores / NPROC_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
# torchrun lends its rendezvous TCPStore to the workers by default, and on a restart the new workers can read
# the dead group's keys from it (gloo and NCCL then dial the old ranks' ports: "Connection refused", or a
# hang; pytorch/pytorch#135712, seen here with torch 2.13). Opting out gives every attempt a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

if [ -n "${RDZV_ENDPOINT:-}" ]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-vae-scale}")
elif [ "$NNODES" = 1 ]; then
    rdzv=(--standalone)
else
    echo "launch/torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT, the same on every node" >&2
    exit 2
fi

exec "${TORCHRUN:-torchrun}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" "${rdzv[@]}" -m vae_scale train "$@"
