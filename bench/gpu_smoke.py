"""GPU smoke test: two TimerPO steps at the real Qwen2.5-VL-3B size with random weights (nothing downloaded).

    torchrun --standalone --nproc_per_node=1 bench/gpu_smoke.py --dist fsdp   # 1 GPU: FSDP2 over 1 rank (bf16)
    torchrun --standalone --nproc_per_node=8 bench/gpu_smoke.py --dist fsdp   # 8 GPUs
    torchrun --standalone --nproc_per_node=1 bench/gpu_smoke.py --dist fsdp --config tiny --device cpu  # CPU path
    python bench/gpu_smoke.py --offload                    # 1 GPU: FSDP2 CPU offload in a one-process group
    python bench/gpu_smoke.py --lora-rank 64               # 1 GPU: LoRA, KL reference = adapters off (β 0.001)
    python bench/gpu_smoke.py --pure-bf16 --grad-checkpointing   # 1 GPU: bf16 weights and AdamW state

(bench/gpu_smoke.sh runs bench/gpu_bench.py: the rollout engine's variants and the one-GPU update.)

Each step is train.py's: rollout (full_params gathered, hand-written sampling with a KV cache) → rewards →
OT grounding + old log-probs → advantages → micro-batched update through FSDP2, on 8 prompts x 5 completions
of up to 256 new tokens (global), β = 0 (no reference model; with --lora-rank the reference is the model
with its adapters off, so β = 0.001 and its forward is timed too). The text side uses the project's tiny
tokenizer: its ids are valid ids of the 151,936-token model, and the config's special-token ids are set to
the tiny tokenizer's. The random model almost never writes an end token, so completions run the full 256
tokens (the rewards are 0; the timing is real).

Printed per step: rollout tokens/s, update time, MFU of the update's forward + backward, peak memory.
MFU = 6 · (N_text · T_seq + N_head · T_scored + N_vision · T_patch) / (update seconds · peak FLOP/s · GPUs), with
N_text the decoder parameters without the input embedding and LM head, T_seq the real (unpadded) prompt +
completion tokens, N_head = vocab · hidden applied to the T_scored completion positions only, N_vision the vision
tower's parameters and T_patch its image patches (every completion's forward re-encodes its image); attention's
quadratic term is left out (< 5 % at these lengths). Peak: H200 / H100 bf16 dense 989 TFLOP/s (--peak-tflops).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import data_gen  # noqa: E402
from memory_table import qwen25vl_config  # noqa: E402
from timerpo.algorithm import (compute_advantages, ground_completions, make_prompt, reference_logprobs,  # noqa: E402
                               rollout, score_outcomes, target_states, update_policy)
from timerpo.distributed import full_params, init_distributed, prepare_policy, rank_slice  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.lora import adapters_disabled, add_adapters  # noqa: E402
from timerpo.optim import BF16AdamW  # noqa: E402
from timerpo.policy import Policy, make_image_processor  # noqa: E402
from timerpo.tiny import build_tiny_policy, build_tiny_tokenizer  # noqa: E402
from train import step_prompt_indices  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="3b", choices=("3b", "7b", "tiny"), help="model size (random weights)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dist", default=None, choices=("none", "ddp", "fsdp"),
                   help="default: fsdp under torchrun, none otherwise")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "test"),
                   help="prompts come from this data folder (generated small in a temp folder when missing)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help="global prompts per step")
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rollout-batch", type=int, default=40)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true", help="train.py --offload: FSDP2 with CPU offload, gradient "
                                                          "checkpointing (a one-process group without torchrun)")
    p.add_argument("--pure-bf16", action="store_true", help="train.py --pure-bf16 (GPU only: bf16 weights)")
    p.add_argument("--lora-rank", type=int, default=0, help="train.py --lora-rank: LoRA adapters of this rank")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="per GPU, bf16 dense")
    p.add_argument("--out", default=None, help="also write the settings and each step's figures to this JSON file "
                                               "(rank 0; rewritten after every step)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dist = args.dist or ("fsdp" if "RANK" in os.environ or args.offload else "none")
    args.grad_checkpointing |= args.offload
    return args


def build_policy(config: str, device: str) -> Policy:
    """A random-weight policy of the requested size, built directly on the device (fp32 master weights)."""
    if config == "tiny":
        policy = build_tiny_policy(seed=0)
        policy.model.to(device)
        return policy
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus())
    names = dict(bos="<|endoftext|>", pad="<|endoftext|>", eos="<|im_end|>", image="<|image_pad|>",
                 video="<|video_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>")
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the host
        model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(config, ids))
    return Policy(model=model, tokenizer=tok, image_processor=make_image_processor(), name=f"{config}-random")


def smoke_data(folder: str, dist) -> str:
    """The data folder to draw prompts from: `folder`, or a small generated anomllm set when it is missing
    (data/ is not part of the repository). Rank 0 writes it; the others wait."""
    if os.path.isfile(os.path.join(folder, "samples.jsonl")):
        return folder
    folder = os.path.join(tempfile.gettempdir(), "timerpo-smoke-data")
    if dist.is_main and not os.path.isfile(os.path.join(folder, "samples.jsonl")):
        data_gen.generate(folder, "anomllm", 2, 42, progress=False)
    dist.barrier()
    return folder


def flop_terms(model) -> dict:
    """Parameter counts of the MFU formula: decoder without embedding/LM head, LM head, vision tower."""
    vision = sum(p.numel() for p in model.model.visual.parameters())
    embed = model.model.language_model.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    text = total - vision - embed - (0 if tied else head)
    return {"text": text, "head": head, "vision": vision, "total": total}


def update_flops(episodes, terms: dict) -> float:
    """6 · (N_text · T_seq + N_head · T_scored + N_vision · T_patch) for this rank's update."""
    seq = sum(len(ep.prompt.encoded.input_ids) + len(ep.completion_ids) for ep in episodes)
    scored = sum(len(ep.completion_ids) for ep in episodes)
    patches = sum(ep.prompt.encoded.pixel_values.shape[0] for ep in episodes)
    return 6.0 * (terms["text"] * seq + terms["head"] * scored + terms["vision"] * patches)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB; whole process RSS


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = init_distributed(args.dist, args.device, offload=args.offload)
    say = print if dist.is_main else (lambda *a, **k: None)
    device = dist.device
    t0 = time.perf_counter()
    policy = build_policy(args.config, device)
    terms = flop_terms(policy.model)
    dtype = torch.bfloat16 if device.startswith("cuda") or args.pure_bf16 else torch.float32  # train.py's default
    if args.lora_rank:
        add_adapters(policy, args.lora_rank, 2.0 * args.lora_rank, base=policy.name)
    prepare_policy(policy, dist, grad_checkpointing=args.grad_checkpointing, dtype=dtype, pure=args.pure_bf16)
    opt_class = BF16AdamW if args.pure_bf16 else torch.optim.AdamW
    optimizer = opt_class([p for p in policy.model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01)
    beta = 0.001 if args.lora_rank else 0.0
    args.data = smoke_data(args.data, dist)
    samples = data_gen.load_samples(args.data)
    gpus = dist.world_size if device.startswith("cuda") else 0
    mem_kind = "max allocated" if gpus else "process RSS so far"
    say(f"[smoke] {args.config}: {terms['total'] / 1e9:.3f} B parameters, {args.dist} over {dist.world_size} "
        f"rank(s) on {torch.cuda.get_device_name() if gpus else 'cpu'}, built in {time.perf_counter() - t0:.0f} s")
    say(f"[smoke] {args.prompts} prompts x {args.group_size} completions, <= {args.max_new_tokens} new tokens, "
        f"micro-batch {args.micro_batch}, rollout batch {args.rollout_batch}, "
        f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, offload {'on' if args.offload else 'off'}, "
        f"pure bf16 {'on' if args.pure_bf16 else 'off'}, LoRA rank {args.lora_rank}")
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "ranks": dist.world_size,
              "device": torch.cuda.get_device_name() if gpus else "cpu", "memory": mem_kind, "steps": []}
    for step in range(args.steps):
        indices = rank_slice(step_prompt_indices(len(samples), args.prompts, step, 0), dist)
        prompts = [make_prompt(policy, args.data, samples, i, "expcot") for i in indices]
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        with full_params(policy, dist):
            episodes = rollout(policy, prompts, group_size=args.group_size, step=step, seed=0,
                               max_new_tokens=args.max_new_tokens, batch_size=args.rollout_batch, keep_states=True)
        sync(device)
        t_rollout = time.perf_counter() - t
        mem_rollout = peak_memory_gb(device)
        score_outcomes(episodes, loc_mode="six-mean")
        t = time.perf_counter()
        with full_params(policy, dist):
            targets = target_states(policy, prompts, max_tokens=512)
            ground_completions(episodes, targets, micro_batch=args.micro_batch, grounding="ot", ot_eps=0.08,
                               ot_iters=50)
        sync(device)
        t_ground = time.perf_counter() - t
        t = time.perf_counter()
        if beta:  # LoRA: the reference is the model with its adapters off
            with full_params(policy, dist), adapters_disabled(policy):
                reference_logprobs(policy, episodes, micro_batch=args.micro_batch)
        sync(device)
        t_ground += time.perf_counter() - t
        compute_advantages(episodes, group_size=args.group_size, mode="timerpo", alpha=0.3, norm="std", tau=0.5,
                           grounding="ot")
        reset_peak(device)
        t = time.perf_counter()
        stats = update_policy(policy, optimizer, episodes, micro_batch=args.micro_batch, clip_eps=0.2, beta=beta,
                              entropy_coef=0.001, max_grad_norm=1.0, dist=dist)
        sync(device)
        t_update = time.perf_counter() - t
        mem_update = peak_memory_gb(device)
        new_tokens, flops = dist.sum([sum(len(ep.completion_ids) for ep in episodes), update_flops(episodes, terms)])
        # MFU only means something against a GPU's peak; on a CPU the line shows "n/a"
        mfu = f"{100 * flops / (t_update * args.peak_tflops * 1e12 * gpus):.1f} %" if gpus else "n/a"
        say(f"[step {step + 1}] rollout {new_tokens:.0f} tokens in {t_rollout:.1f} s = {new_tokens / t_rollout:.0f} "
            f"tokens/s | grounding{' + reference' if beta else ''} {t_ground:.1f} s | update {t_update:.1f} s ({flops / 1e12:.3f} TFLOP, MFU {mfu}) "
            f"| step {t_rollout + t_ground + t_update:.1f} s | peak memory rank 0 ({mem_kind}): rollout "
            f"{mem_rollout:.1f} GB, update {mem_update:.1f} GB | loss {stats['loss']:.4f}, grad norm "
            f"{stats['grad_norm']:.3f}")
        report["steps"].append({
            "step": step + 1, "rollout_s": round(t_rollout, 2), "tokens_per_s": round(new_tokens / t_rollout),
            "grounding_reference_s": round(t_ground, 2), "update_s": round(t_update, 2), "mfu": mfu,
            "peak_rollout_gb": round(mem_rollout, 2), "peak_update_gb": round(mem_update, 2),
            "loss": stats["loss"], "grad_norm": stats["grad_norm"]})
        if args.out and dist.is_main:
            write_atomic(args.out, json.dumps(report, indent=1) + "\n")
    say(f"[smoke] done in {time.perf_counter() - t0:.0f} s")
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
