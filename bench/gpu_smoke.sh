#!/usr/bin/env bash
# GPU smoke test (bench/gpu_smoke.py): 2 TimerPO steps on a random-weight Qwen2.5-VL-3B, 8 prompts x 5
# completions, 256 new tokens, FSDP2 with bf16 compute. Needs CUDA and nothing downloaded; fits a 10-minute
# window on one H200 (time-capped here at SMOKE_TIMEOUT seconds, default 540).
#   bash bench/gpu_smoke.sh                         # 1 GPU
#   NPROC=8 bash bench/gpu_smoke.sh                 # 8 GPUs of one node
#   bash bench/gpu_smoke.sh --config tiny --device cpu   # the same path on a CPU (no CUDA needed)
# Extra arguments go to bench/gpu_smoke.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-1}"
if [[ " $* " != *" --device cpu "* ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke.sh: no CUDA device visible (pass --config tiny --device cpu to exercise the code path on a CPU)" >&2
    exit 2
fi
exec timeout "${SMOKE_TIMEOUT:-540}" python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    bench/gpu_smoke.py --dist fsdp "$@"
