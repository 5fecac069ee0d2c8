#!/bin/bash
# Start one node's ranks with torchrun, for machines without SLURM. Run it on every node:
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0's address> launch/torchrun.sh pretrain +cluster=h100x64 hydra.run.dir=runs/x
#   launch/torchrun.sh pretrain +cluster=h100x8 hydra.run.dir=runs/x          # one node
#
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; Lightning reads them
# (TorchElasticEnvironment). Give every node the same hydra.run.dir (shared storage) so that
# checkpoints, and the resume after a restart, are in one place. SIGTERM to the ranks saves
# checkpoints/last.ckpt and ends the run; starting the same command again resumes from it.
# Signal the ranks themselves (e.g. `pkill -TERM -f "m train"`): torchrun passes a signal it gets
# on to them but SIGKILLs any rank still running 30 s later, too soon for a large checkpoint.
# PYTHON: the interpreter with the project installed (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE="$1"; shift
PYTHON="${PYTHON:-.venv/bin/python}"
NPROC="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m train "$STAGE" "$@"
