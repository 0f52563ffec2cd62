#!/usr/bin/env bash
# Launch a qlx run on every host of a Cloud TPU pod slice (e.g. v5p-128).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/qwen3-30b-a3b/tpu-v5p-128.yaml [--set key=value ...]
#
# Each host gets the same command; jax.distributed detects the slice from the TPU metadata (qlx/distributed.py), the
# mesh in the config spans all chips, and checkpoints go to the config's checkpoint dir (use a gs:// bucket).
# The repository is copied to every host and installed with `make install` first.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [qlx train args ...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; config="$3"; shift 3
repo_dir="qlx"

gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all . "$tpu:~/$repo_dir"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd ~/$repo_dir
  make install PYTHON=python3.11
  .venv/bin/pip install -q 'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)'
  .venv/bin/qlx train --config $config $*
"
