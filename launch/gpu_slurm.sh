#!/usr/bin/env bash
# Launch a qlx run on a Slurm GPU cluster: one process per node, each owning that node's GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/qwen3-30b-a3b/h100x8.yaml [--set key=value ...]
#
# jax.distributed detects Slurm itself (qlx/distributed.py); the config's mesh must multiply to nodes x GPUs.
# Install once on shared storage: `make install` then `.venv/bin/pip install "jax[cuda12]==<jax version>"`.
#SBATCH --job-name=qlx
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [slurm options] $0 CONFIG [qlx train args ...]" >&2
  exit 2
fi
config="$1"; shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
srun --kill-on-bad-exit=1 .venv/bin/qlx train --config "$config" "$@"
