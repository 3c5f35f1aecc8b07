#!/usr/bin/env bash
# Multi-node launch with plain torchrun: run this on every node with NODE_RANK set
# (0..NNODES-1) and MASTER_ADDR pointing at node 0. Convert once beforehand (any layout: the
# checkpoint reshards on load):
#   python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen2.5-32B \
#       --output /checkpoints/qwen2.5-32b-megatron --tp 8 --pp 2 --dtype bf16
set -euo pipefail
NNODES=${NNODES:-16}
torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node 8 \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
  -m dapo_megatron.train --config examples/qwen2.5_32b_dapo.yaml "$@"
