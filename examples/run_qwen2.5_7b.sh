#!/usr/bin/env bash
# One node, 8 GPUs: convert once, then train. Usage: bash examples/run_qwen2.5_7b.sh
set -euo pipefail
HF=${HF:-/models/Qwen2.5-7B}
CKPT=${CKPT:-/checkpoints/qwen2.5-7b-megatron}
if [ ! -d "$CKPT" ]; then
  python tools/convert_hf_to_megatron.py --hf-dir "$HF" --output "$CKPT" --tp 4 --dtype bf16
fi
torchrun --nproc-per-node 8 -m dapo_megatron.train --config examples/qwen2.5_7b_dapo.yaml \
  model.hf_dir="$HF" model.megatron_checkpoint="$CKPT" "$@"
