"""GPU benchmark of the rollout engine and the update on the real Qwen2.5-VL-3B architecture, random weights.

    bash bench/gpu_smoke.sh                          # one GPU, < 8 min on an H200; writes bench/results/gpu_bench.json
    python bench/gpu_bench.py --smoke                # the same code path on the CPU with the tiny config, seconds

Rollout (train.py's step 1, states kept for TimerPO), G = 5 completions per prompt, for three variants:
    fp32-eager       fp32 weights, eager decode step over the static KV cache
    bf16-eager       the bf16 rollout copy (--dtype bf16), eager decode step
    bf16-compiled    the bf16 rollout copy, decode step under torch.compile (CUDA graphs: "reduce-overhead")
at rollout batch 64 and 640 (or the largest batch the free memory holds, rollout.rollout_batch_for_memory).
Each (variant, batch) is run twice with different seeds: the first run is untimed (lazy allocations, cuDNN/BLAS
autotuning, torch.compile's compilation and CUDA-graph recording), the second is timed. A random model almost
never writes an end token, so every completion runs to --max-new-tokens: tokens/s is the full batch's.

Update (train.py's step 5 with --dtype bf16: bf16 autocast over fp32 master weights, AdamW): 8 prompts x 5
completions from a bf16 rollout, micro-batch 4, two updates, the second timed. MFU as in bench/gpu_smoke.py:
6 · (N_text · T_seq + N_head · T_scored + N_vision · T_patch) / (seconds · peak FLOP/s), with each distinct image
encoded once per micro-batch (encode_images_once), which is what the update now computes.
Peak memory: torch.cuda.max_memory_allocated per measurement (process RSS on the CPU).

The JSON is rewritten after every measurement, so a run cut short by the time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import data_gen  # noqa: E402
from gpu_smoke import (H200_BF16_DENSE_TFLOPS, build_policy, flop_terms, peak_memory_gb, reset_peak,  # noqa: E402
                       smoke_data, sync)
from timerpo.algorithm import (compute_advantages, ground_completions, rollout, score_outcomes,  # noqa: E402
                               target_states, update_policy)
from timerpo.files import write_atomic  # noqa: E402
from timerpo.distributed import SINGLE  # noqa: E402
from timerpo.precision import enable_tf32, setup_precision  # noqa: E402
from timerpo.rollout import decode_bytes_per_row, rollout_batch_for_memory  # noqa: E402
from train import make_prompt, step_prompt_indices  # noqa: E402

VARIANTS = ("fp32-eager", "bf16-eager", "bf16-compiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="3b", choices=("3b", "7b", "tiny"), help="model size (random weights)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "test"),
                   help="prompts come from this data folder (generated small in a temp folder when missing)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 640], help="rollout batch sizes")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--update-prompts", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="per GPU, bf16 dense")
    p.add_argument("--smoke", action="store_true",
                   help="tiny config on the CPU, batches 4 and 8, 4 new tokens, 2 update prompts: checks the path")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "gpu_bench.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.device, args.batches = "tiny", args.device or "cpu", [4, 8]
        args.max_new_tokens, args.update_prompts, args.group_size, args.micro_batch = 4, 2, 2, 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def fitting_batch(policy, wanted: int, prompt_len: int, max_new_tokens: int) -> int:
    """`wanted`, or on CUDA the largest batch whose decode state fits in 90 % of the free memory."""
    if not policy.device.type == "cuda":
        return wanted
    free, _ = torch.cuda.mem_get_info(policy.device)
    element = next(policy.sampler.parameters()).element_size()
    per_row = decode_bytes_per_row(policy.model.config.get_text_config(), prompt_len + max_new_tokens, element)
    return rollout_batch_for_memory(wanted, per_row, 0.9 * free)


def use_variant(policy, variant: str, bf16_copy) -> None:
    """Point the policy's sampling at its fp32 weights or at their bf16 copy, compiled or not."""
    policy.rollout_model = None if variant == "fp32-eager" else bf16_copy
    policy.compile_decode = variant == "bf16-compiled"
    policy.decoder = None


def time_rollout(policy, prompts, args, batch: int, step: int) -> dict:
    """One rollout of len(prompts) x G completions in batches of `batch`: seconds, tokens, peak memory."""
    reset_peak(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    episodes = rollout(policy, prompts, group_size=args.group_size, step=step, seed=0,
                       max_new_tokens=args.max_new_tokens, batch_size=batch, keep_states=True)
    sync(args.device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(ep.completion_ids) for ep in episodes)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "completions": len(episodes),
            "peak_memory_gb": peak_memory_gb(args.device)}


def time_update(policy, prompts, args, terms: dict) -> dict:
    """Two bf16 updates (train.py steps 1-5, β = 0); the second is timed. MFU against --peak-tflops."""
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-6, weight_decay=0.01)
    out = {}
    for step in range(2):
        episodes = rollout(policy, prompts, group_size=args.group_size, step=100 + step, seed=0,
                           max_new_tokens=args.max_new_tokens, batch_size=len(prompts) * args.group_size,
                           keep_states=True)
        score_outcomes(episodes, loc_mode="six-mean")
        targets = target_states(policy, prompts, max_tokens=512)
        ground_completions(episodes, targets, micro_batch=args.micro_batch, grounding="ot", ot_eps=0.08, ot_iters=50)
        compute_advantages(episodes, group_size=args.group_size, mode="timerpo", alpha=0.3, norm="std", tau=0.5,
                           grounding="ot")
        reset_peak(args.device)
        sync(args.device)
        t0 = time.perf_counter()
        stats = update_policy(policy, optimizer, episodes, micro_batch=args.micro_batch, clip_eps=0.2, beta=0.0,
                              entropy_coef=0.001, max_grad_norm=1.0, dist=SINGLE)
        sync(args.device)
        seconds = time.perf_counter() - t0
        flops = update_flops(episodes, terms, args.micro_batch)
        gpus = 1 if args.device.startswith("cuda") else 0
        out = {"seconds": seconds, "tflop": flops / 1e12, "completions": len(episodes),
               "tokens": sum(len(ep.completion_ids) for ep in episodes),
               "mfu": flops / (seconds * args.peak_tflops * 1e12) if gpus else None,
               "peak_memory_gb": peak_memory_gb(args.device), "loss": stats["loss"], "grad_norm": stats["grad_norm"]}
    return out


def update_flops(episodes, terms: dict, micro_batch: int) -> float:
    """6 · (N_text · T_seq + N_head · T_scored + N_vision · T_patch), images counted once per micro-batch."""
    seq = sum(len(ep.prompt.encoded.input_ids) + len(ep.completion_ids) for ep in episodes)
    scored = sum(len(ep.completion_ids) for ep in episodes)
    patches = 0
    for start in range(0, len(episodes), micro_batch):
        distinct = {id(ep.prompt.encoded): ep.prompt.encoded for ep in episodes[start:start + micro_batch]}
        patches += sum(enc.pixel_values.shape[0] for enc in distinct.values())
    return 6.0 * (terms["text"] * seq + terms["head"] * scored + terms["vision"] * patches)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    enable_tf32(args.device)
    policy = build_policy(args.config, args.device)  # fp32 master weights
    terms = flop_terms(policy.model)
    setup_precision(policy, torch.bfloat16)  # autocast + bf16 rollout copy
    bf16_copy = policy.rollout_model
    data = smoke_data(args.data, SINGLE)
    samples = data_gen.load_samples(data)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "config": args.config, "args": vars(args),
              "parameters": terms["total"], "rollout": [], "update": None}

    def save():
        report["seconds_total"] = time.perf_counter() - t_start
        write_atomic(args.results, json.dumps(report, indent=1))

    print(f"[bench] {args.config}: {terms['total'] / 1e9:.3f} B parameters on {device_name}; G = {args.group_size}, "
          f"<= {args.max_new_tokens} new tokens", flush=True)
    for batch in args.batches:
        n_prompts = max(1, batch // args.group_size)
        prompts = [make_prompt(policy, data, samples, i % len(samples), "expcot") for i in range(n_prompts)]
        prompt_len = max(len(p.encoded.input_ids) for p in prompts)
        for variant in args.variants:
            use_variant(policy, variant, bf16_copy)
            size = fitting_batch(policy, n_prompts * args.group_size, prompt_len, args.max_new_tokens)
            try:
                time_rollout(policy, prompts, args, size, step=0)  # untimed: allocation, tuning, compilation
                row = time_rollout(policy, prompts, args, size, step=1)
            except Exception as err:  # noqa: BLE001  (out of memory, a compile failure: record it, go on)
                row = {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"}
            row.update(variant=variant, requested_batch=batch, batch=size)
            report["rollout"].append(row)
            save()
            shown = (f"{row['tokens_per_s']:.0f} tokens/s, {row['seconds']:.2f} s/rollout, peak "
                     f"{row['peak_memory_gb']:.1f} GB") if "error" not in row else row["error"]
            print(f"[rollout] {variant:14s} batch {size:4d}: {shown}", flush=True)
            policy.decoder = None  # free the kept KV buffers before the next variant
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    use_variant(policy, "bf16-compiled" if "bf16-compiled" in args.variants else "bf16-eager", bf16_copy)
    prompts = [make_prompt(policy, data, samples, i % len(samples), "expcot")
               for i in step_prompt_indices(len(samples), args.update_prompts, 0, 0)]
    report["update"] = time_update(policy, prompts, args, terms)
    save()
    u = report["update"]
    mfu = f"{100 * u['mfu']:.1f} %" if u["mfu"] is not None else "n/a"
    print(f"[update] {u['completions']} completions, micro-batch {args.micro_batch}: {u['seconds']:.2f} s, "
          f"{u['tflop']:.2f} TFLOP, MFU {mfu}, peak {u['peak_memory_gb']:.1f} GB", flush=True)
    print(f"[bench] done in {time.perf_counter() - t_start:.0f} s -> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
