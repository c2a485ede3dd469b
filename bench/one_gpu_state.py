"""What each one-GPU mode of train.py keeps on the GPU for weights, gradients and optimizer state, counted on the
real Qwen2.5-VL-3B / 7B architectures (meta device: exact parameter counts, nothing allocated or downloaded).

    python bench/one_gpu_state.py            # prints a markdown table, writes bench/results/one_gpu_state.json

N = all parameters, L = LoRA's trained parameters (peft's adapters put into the meta model by timerpo/lora.py,
so L is what `--lora-rank R` trains). Bytes resident on the GPU through a step, in one process, `--dtype bf16`:

    paper (no flag)   16·N  fp32 weights, gradients, AdamW m and v
                    + 2·N   the bf16 KL reference + 2·N the bf16 rollout copy
    --offload         0     the 16·N and the reference live in host memory; the GPU holds one unit's gathered
                            bf16 weights at a time, and all of them (2·N) during the rollout and the reference
                            forward (counted in the last column)
    --pure-bf16       8·N   bf16 weights, gradients, m and v + 2·N reference; no rollout copy
    --lora-rank R     2·N   the frozen base in bf16, shared with the rollout copy (no reference: adapters off)
                    + 18·L  fp32 adapters, their gradients, m and v, and their bf16 copy

Activations, the KV cache and the sampler's buffers come on top (docs/memory.md); they do not depend on the
mode, except that --offload turns on gradient checkpointing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from memory_table import qwen25vl_config  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from timerpo.files import write_atomic  # noqa: E402
from timerpo.lora import add_adapters  # noqa: E402
from timerpo.policy import Policy  # noqa: E402

GB = 1e9
RANKS = (8, 16, 64)


def counts(size: str) -> dict:
    """N (the model without adapters), and L for each LoRA rank in RANKS (default targets), from meta-device
    builds."""
    out = {"ranks": {}}
    for rank in RANKS:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(size))
        out["N"] = sum(p.numel() for p in model.parameters())
        add_adapters(Policy(model=model, tokenizer=None, image_processor=None, name=size), rank, 2.0 * rank)
        out["ranks"][rank] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def modes(n: int, lora: dict) -> list[dict]:
    """One row per mode: GB resident through the step, and what the rollout phase adds (gathered weights)."""
    rows = [{"mode": "paper (fp32 master weights)", "flags": "", "resident": 20 * n, "rollout_extra": 0},
            {"mode": "offload", "flags": "--offload", "resident": 0, "rollout_extra": 2 * n},
            {"mode": "pure bf16", "flags": "--pure-bf16", "resident": 10 * n, "rollout_extra": 0}]
    rows += [{"mode": f"LoRA rank {r}", "flags": f"--lora-rank {r}", "resident": 2 * n + 18 * l,
              "rollout_extra": 0, "trained": l} for r, l in lora.items()]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results", "one_gpu_state.json"))
    args = p.parse_args(argv)
    report = {"command": "python bench/one_gpu_state.py", "models": {}}
    lines = ["| model | mode | flags | trained parameters | weights + gradients + optimizer + reference + "
             "rollout copy on the GPU (GB) | + during rollout (GB) |", "|---|---|---|---|---|---|"]
    for size in ("3b", "7b"):
        c = counts(size)
        n = c["N"]
        lora = {r: c["ranks"][r] for r in RANKS}
        rows = modes(n, lora)
        report["models"][size] = {"parameters": n, "lora_trained": lora, "rows": rows}
        for row in rows:
            trained = row.get("trained", n)
            lines.append(f"| {size.upper()} | {row['mode']} | `{row['flags']}` | {trained / 1e6:,.1f} M "
                         f"({100 * trained / n:.2f} %) | {row['resident'] / GB:.1f} | {row['rollout_extra'] / GB:.1f} |")
    print("\n".join(lines))
    report["table"] = "\n".join(lines)
    write_atomic(args.results, json.dumps(report, indent=1))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
