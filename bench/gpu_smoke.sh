#!/usr/bin/env bash
# GPU benchmark (bench/gpu_bench.py) on a random-weight Qwen2.5-VL-3B, one GPU, nothing downloaded:
#   rollout tokens/s and s/rollout for fp32-eager, bf16-eager and bf16-compiled at rollout batch 64 and 640
#   (or the largest that fits), then the bf16 update's MFU and peak memory -> bench/results/gpu_bench.json.
# Sized for < 8 minutes on one H200 (time-capped at SMOKE_TIMEOUT seconds, default 470; the JSON is rewritten
# after every measurement, so a capped run keeps what it measured).
#   bash bench/gpu_smoke.sh                       # one GPU
#   bash bench/gpu_smoke.sh --smoke               # the same code path on a CPU with the tiny config (no CUDA)
# Extra arguments go to bench/gpu_bench.py (see its --help). Two full TimerPO steps under FSDP2 on N GPUs:
#   torchrun --standalone --nproc_per_node=N bench/gpu_smoke.py --dist fsdp
# and the one-GPU modes of train.py, two steps each at the 3B size (each prints peak memory per phase):
#   python bench/gpu_smoke.py --offload                   # FSDP2 CPU offload, one-process group
#   python bench/gpu_smoke.py --lora-rank 64              # LoRA; the reference forward with adapters off
#   python bench/gpu_smoke.py --pure-bf16 --grad-checkpointing
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --smoke "* ]] && [[ " $* " != *" --device cpu "* ]] && \
        ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke.sh: no CUDA device visible (pass --smoke to exercise the code path on a CPU)" >&2
    exit 2
fi
exec timeout "${SMOKE_TIMEOUT:-470}" python bench/gpu_bench.py "$@"
