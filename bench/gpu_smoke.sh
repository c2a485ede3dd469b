#!/usr/bin/env bash
# One GPU, random-weight Qwen2.5-VL-3B, nothing downloaded. Three parts, each time-capped (a capped part keeps
# what it measured, since every JSON is rewritten after each measurement):
#   1. bench/gpu_bench.py: rollout tokens/s and s/rollout for fp32-eager, bf16-eager and bf16-compiled at rollout
#      batch 64 and 640 (or the largest that fits), then the bf16 update's MFU and peak memory
#      -> bench/results/gpu_bench.json (cap: SMOKE_TIMEOUT seconds, default 420)
#   2. bench/gpu_smoke.py --offload: two TimerPO steps with FSDP2 CPU offload in a one-process group, the
#      paper's exact run on one GPU -> bench/results/gpu_smoke_offload.json (cap: MODE_TIMEOUT, default 150)
#   3. bench/gpu_smoke.py --lora-rank 64: two steps with LoRA, the KL reference being the adapters switched off
#      -> bench/results/gpu_smoke_lora.json (cap: MODE_TIMEOUT)
# Each step of parts 2 and 3 prints and records its peak memory (max allocated) in the rollout and the update.
# Sized for about 12 minutes on one H100 or H200.
#   bash bench/gpu_smoke.sh              # on a GPU
#   bash bench/gpu_smoke.sh --smoke      # the same code paths on a CPU with the tiny config (no CUDA)
# Extra arguments go to bench/gpu_bench.py (see its --help). Other runs of bench/gpu_smoke.py:
#   torchrun --standalone --nproc_per_node=N bench/gpu_smoke.py --dist fsdp   # two steps under FSDP2 on N GPUs
#   python bench/gpu_smoke.py --pure-bf16 --grad-checkpointing                # bf16 weights and AdamW state
set -uo pipefail
cd "$(dirname "$0")/.."
mode_args=()
if [[ " $* " == *" --smoke "* ]] || [[ " $* " == *" --device cpu "* ]]; then
    mode_args=(--config tiny --device cpu)
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke.sh: no CUDA device visible (pass --smoke to exercise the code path on a CPU)" >&2
    exit 2
fi
status=0
timeout "${SMOKE_TIMEOUT:-420}" python bench/gpu_bench.py "$@" || status=$?
for mode in offload lora; do
    flags=(--offload)
    [[ $mode == lora ]] && flags=(--lora-rank 64)
    timeout "${MODE_TIMEOUT:-150}" python bench/gpu_smoke.py "${flags[@]}" "${mode_args[@]}" \
        --out "bench/results/gpu_smoke_${mode}.json" || status=$?
done
exit $status
