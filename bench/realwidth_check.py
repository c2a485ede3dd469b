"""Real-width numerics on the CPU: the real Qwen2.5-VL-3B architecture through the rollout, the update forward,
train.py and eval.py.

    python bench/realwidth_check.py                    # -> bench/results/realwidth.json
    python bench/realwidth_check.py --layers 2 --vision-depth 2 --out /tmp/rw.json   # a quick try at cut depth

Not a test: it builds a 7 GB model folder (in --work, default a temporary folder, deleted at the end) and peaks
at about 13 GB of memory; run it alone (one such job at a time). What it does:
  1. builds the real 3B architecture (config of Qwen2.5-VL-3B-Instruct, 3.75 B parameters) with random bf16
     weights and Qwen's own tokenizer files, laid out like the hub's folder (tests/qwen_folder.py), and loads it
     with the project's load_policy in bf16;
  2. greedy decoding of two real prompts (plots of data/train) three ways, which must agree:
       transformers' `model.generate` (its own positions, its own dynamic cache; the reference),
       the project's rollout `sample_completions` (one shared prefill per prompt, the static cache, compaction
       when rows end: rows [A, A, B], where a token A emits half-way is declared an end token, so the A rows
       end early and the B row goes on alone in a compacted cache),
       one full transformers forward over prompt + completion (all logits, positions computed by transformers);
     then the update forward (timerpo.rollout.completion_forward in train mode, gradients on: what
     update_policy runs) against the rollout: its log-probs and its last-layer states against the states the
     rollout kept for the OT;
  3. one `python train.py --model FOLDER` step at real width with the depth cut (2 decoder layers, 4 vision
     blocks, so fp32 AdamW fits in 24 GB of RAM), then `python eval.py --model RUN` on its checkpoint.
Log-probs are compared where the tokens agree; bf16 can flip a greedy token at a near-tie, which counts as
agreement when the reference's log-probs of the two tokens are within TIE_TOL (the comparison stops there,
since the continuations differ). Time and peak memory (resident set, this process and each child) are in
the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import timerpo.policy as policy_module  # noqa: E402
from memory_table import qwen25vl_config  # noqa: E402
from tests.qwen_folder import build_qwen_folder  # noqa: E402
from timerpo.algorithm import make_prompt  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import encode_prompt, load_policy  # noqa: E402
from timerpo.rollout import Decoder, collate, completion_forward, masked_log_softmax, sample_completions  # noqa: E402

# bf16 tolerances (nats; relative for states). Two bf16 computations of one log-prob differ by the rounding of
# ~36 layers of bf16 matmuls in a different order (cache vs no cache, batch shapes); measured differences at
# real width are in the JSON beside these bounds.
LOGP_TOL = 0.1  # |Δ log π| of one token, same tokens
TIE_TOL = 0.1  # a flipped greedy token is a near-tie: the reference's log π of the two tokens within this
STATE_TOL = 0.05  # ‖Δh‖ / ‖h‖ of one kept state against the update forward's
SAFE_MARGIN = 1e-2  # where the declared end token may sit: greedy margins above this cannot flip (see declared_end)
NEW_TOKENS = 24
RESULTS = os.path.join(HERE, "results", "realwidth.json")


def peak_rss_gb() -> float:
    """This process's peak resident set so far (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


class Clock:
    """Seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        print(f"[realwidth] {name} ...", flush=True)
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[realwidth] {name}: {self.seconds[name]} s, peak RSS {peak_rss_gb()} GB", flush=True)


def real_3b_config(layers: int | None = None, vision_depth: int | None = None):
    """The Qwen2.5-VL-3B-Instruct config; `layers` / `vision_depth` cut the depth (width unchanged)."""
    config = qwen25vl_config("3b", **({"num_hidden_layers": layers} if layers else {}))
    if vision_depth:
        config.vision_config.depth = vision_depth
        config.vision_config.fullatt_block_indexes = [vision_depth - 1]
    return config


# ---------------------------------------------------------------------------------------------------
# Step 2: three greedy decodings and the update forward


def two_prompts(policy, folder: str, samples: list) -> list:
    """A: the task prompt of data row 0 (its plot and the project's question). B: the plot of row 1 with a short
    question of another kind, so that the two greedy completions part early (a random model's greedy tokens
    follow the shared chat layout for a while when only the series length in the question differs)."""
    a = make_prompt(policy, folder, samples, 0, "expcot").encoded
    with Image.open(os.path.join(folder, samples[1].image)) as img:
        b = encode_prompt(policy, img, "Describe this plot in one sentence.")
    return [a, b]


def generate_greedy(policy, prompts, new_tokens: int):
    """transformers' greedy `generate` (forbidden tokens suppressed, as our sampler masks them): token ids
    and their log π under the masked log-softmax, per prompt."""
    batch = collate(policy, prompts)
    out = policy.model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, suppress_tokens=policy.forbidden_ids,
        output_logits=True, return_dict_in_generate=True, pad_token_id=policy.pad_id)
    tokens = out.sequences[:, batch.input_ids.shape[1]:]  # [B, N]
    logp = masked_log_softmax(torch.stack(out.logits, dim=1), policy.forbidden_ids)  # [B, N, V]
    return tokens.tolist(), logp


def declared_end(gen_ids: list[list[int]], gen_logp: torch.Tensor) -> tuple[int, int]:
    """A token that A's greedy completion emits at some position k for the first time and B's does not emit
    up to k: declared an end token, it ends the A rows at k while B goes on. k is taken before A's first
    near-tie (top-two margin below SAFE_MARGIN), where a bf16 difference could make our rollout take the
    other token and never reach it; the latest such k, at most half-way. (position, token)"""
    gen_a, gen_b = gen_ids
    top2 = gen_logp[0].topk(2, dim=-1).values  # [N, 2]
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    safe = next((j for j, m in enumerate(margins) if m < SAFE_MARGIN), len(gen_a))
    for k in range(min(len(gen_a) // 2, safe - 1), 0, -1):
        if gen_a[k] not in gen_a[:k] and gen_a[k] not in gen_b[:k + 1]:
            return k, gen_a[k]
    raise RuntimeError(f"no token of A's greedy completion can serve as its end (first near-tie at {safe}; "
                       f"A {gen_a}, B {gen_b})")


def compare_logprobs(ours_ids, ours_logp, ref_ids, ref_logp_all) -> dict:
    """Our tokens and log-probs against a reference's greedy tokens and its [N, V] log-probs, position by
    position up to the first flipped token (a near-tie if the reference's log π of both tokens are close)."""
    n = min(len(ours_ids), len(ref_ids))
    flip = next((j for j in range(n) if ours_ids[j] != ref_ids[j]), None)
    upto = n if flip is None else flip
    diffs = [abs(float(ours_logp[j]) - float(ref_logp_all[j, ours_ids[j]])) for j in range(upto)]
    row = {"compared": upto, "max_abs_logp_diff": round(max(diffs, default=0.0), 5)}
    if flip is not None:
        margin = float(ref_logp_all[flip, ref_ids[flip]] - ref_logp_all[flip, ours_ids[flip]])
        row.update(flipped_at=flip, tie_margin=round(margin, 5))
    row["ok"] = row["max_abs_logp_diff"] <= LOGP_TOL and (flip is None or row["tie_margin"] <= TIE_TOL)
    return row


def count_compactions():
    """Decoder.compact wrapped to count its calls."""
    calls = []
    original = Decoder.compact

    def compact(self, keep, filled):
        calls.append(len(keep))
        return original(self, keep, filled)
    return calls, original, compact


def numerics(policy, prompts, clock: Clock) -> dict:
    """Step 2 of the module docstring. prompts = [A, B]."""
    a, b = prompts
    with clock("generate"), torch.no_grad():
        gen_ids, gen_logp = generate_greedy(policy, prompts, NEW_TOKENS)
    k, end_token = declared_end(gen_ids, gen_logp)
    end_name = policy.tokenizer.convert_ids_to_tokens(end_token)
    calls, original, compact = count_compactions()
    ends = policy_module.END_TOKENS
    policy_module.END_TOKENS, Decoder.compact = ends + (end_name,), compact
    try:
        with clock("rollout"):
            rows = sample_completions(policy, [a, a, b], seeds=[0, 1, 2], max_new_tokens=NEW_TOKENS,
                                      temperature=0.0, with_states=True)
    finally:
        policy_module.END_TOKENS, Decoder.compact = ends, original
    ours = {"A": rows[0], "A again": rows[1], "B": rows[2]}
    report = {
        "declared_end": {"token": end_token, "text": end_name, "position": k},
        "rollout_lengths": {name: len(r[0]) for name, r in ours.items()},
        "compactions": calls,
        "shared_prefill_rows_equal": rows[0][0] == rows[1][0] and rows[0][1] == rows[1][1],
        "rollout_vs_generate": {
            "A": compare_logprobs(rows[0][0], rows[0][1], gen_ids[0][:k + 1], gen_logp[0]),
            "B": compare_logprobs(rows[2][0], rows[2][1], gen_ids[1], gen_logp[1]),
        },
    }
    completions = [rows[0][0], rows[2][0]]
    batch = collate(policy, prompts, completions)
    P, C = batch.prompt_len, batch.completion_mask.shape[1]
    with clock("full forward"), torch.no_grad():
        logits = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                              mm_token_type_ids=batch.mm_token_type_ids, use_cache=False).logits  # [B, P+C, V]
        full = masked_log_softmax(logits[:, P - 1:P + C - 1], policy.forbidden_ids)  # [B, C, V]
        del logits
    report["rollout_vs_full_forward"] = {
        name: compare_logprobs(r[0], r[1], r[0], full[i]) for i, (name, r) in enumerate((("A", rows[0]),
                                                                                     ("B", rows[2])))}
    with clock("update forward"):
        policy.model.train()
        logprobs, hidden, _ = completion_forward(policy, batch, with_hidden=True, with_entropy=True)  # [B, C]
        policy.model.eval()
    update = {}
    for i, (name, (ids, logps, states)) in enumerate((("A", rows[0]), ("B", rows[2]))):
        n = len(ids)
        h = hidden[i, :n].detach().float()  # [n, D]
        rel = ((states.float() - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-6)).max().item()
        logp_diff = (logprobs[i, :n].detach() - torch.tensor(logps)).abs().max().item()
        update[name] = {"tokens": n, "max_abs_logp_diff": round(logp_diff, 5), "max_rel_state_diff": round(rel, 5),
                        "ok": logp_diff <= LOGP_TOL and rel <= STATE_TOL}
    report["update_forward_vs_rollout"] = update
    checks = [report["shared_prefill_rows_equal"], bool(calls), report["rollout_lengths"]["A"] == k + 1] + [
        row["ok"] for group in ("rollout_vs_generate", "rollout_vs_full_forward", "update_forward_vs_rollout")
        for row in report[group].values()]
    report["ok"] = all(checks)
    return report


# ---------------------------------------------------------------------------------------------------
# Step 3: train.py and eval.py at real width, depth cut


def run_child(args: list[str], log: str) -> dict:
    """Run a Python script of the project; its exit code, seconds and peak RSS (its own, from wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(["python", *args]), "exit_code": code,
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2 ** 20, 2)}


def train_and_eval(work: str, data: str, eval_data: str, layers: int, vision_depth: int, clock: Clock) -> dict:
    """One train.py step on a real-width folder with `layers` decoder layers, then eval.py on its checkpoint."""
    folder = os.path.join(work, f"qwen3b-{layers}layers")
    with clock("build cut-depth folder"):
        build_qwen_folder(folder, seed=1, config=real_3b_config(layers, vision_depth), dtype=torch.bfloat16)
    runs = os.path.join(work, "runs")
    name = time.strftime("realwidth-%Y%m%d-%H%M%S")  # a fresh run folder every time
    flags = ["--model", folder, "--data", data, "--eval-data", eval_data, "--out", runs, "--name", name,
             "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
             "--micro-batch", "4", "--rollout-batch", "4", "--eval-samples", "2", "--eval-every", "1",
             "--save-every", "1", "--expcot-max-tokens", "64", "--no-progress"]
    with clock("train.py step"):
        trained = run_child(["train.py", *flags], os.path.join(work, "train.log"))
    run_dir = os.path.join(runs, name)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))] \
        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else []
    trained.update(steps_logged=len(metrics), checkpoints=sorted(f for f in os.listdir(run_dir) if f.startswith("ckpt"))
                   if os.path.isdir(run_dir) else [], loss=metrics[-1]["loss"] if metrics else None)
    out = os.path.join(work, "eval")
    with clock("eval.py on the checkpoint"):
        evaluated = run_child(["eval.py", "--model", run_dir, "--data", eval_data, "--limit", "2",
                               "--max-new-tokens", "8", "--out", out, "--no-progress"], os.path.join(work, "eval.log"))
    results = os.path.join(out, "results.json")
    evaluated["scored"] = json.load(open(results))["summary"]["n"] if os.path.isfile(results) else 0
    ok = trained["exit_code"] == 0 and trained["steps_logged"] == 1 and trained["checkpoints"] \
        and evaluated["exit_code"] == 0 and evaluated["scored"] == 2
    return {"layers": layers, "vision_depth": vision_depth, "train": trained, "eval": evaluated, "ok": bool(ok)}


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data", "train"), help="prompts and train.py's data")
    p.add_argument("--eval-data", default=os.path.join(ROOT, "data", "test"), help="train.py and eval.py's held-out data")
    p.add_argument("--work", default=None, help="where the model folders and the run go, kept (a model folder "
                                                 "already there is reused); default: a temporary folder, deleted")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the numerics model (default: 36, "
                                                            "the real depth)")
    p.add_argument("--vision-depth", type=int, default=None, help="vision blocks of the numerics model (default: 32)")
    p.add_argument("--train-layers", type=int, default=2, help="decoder layers of the train.py model")
    p.add_argument("--train-vision-depth", type=int, default=4, help="vision blocks of the train.py model")
    p.add_argument("--skip-train", action="store_true", help="only the numerics (step 2)")
    p.add_argument("--skip-numerics", action="store_true", help="only the train.py step and eval.py (step 3); the "
                                                                "numerics of an earlier run in --out are kept")
    p.add_argument("--out", default=RESULTS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    clock = Clock()
    work = args.work or tempfile.mkdtemp(prefix="timerpo-realwidth-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "tolerances": {"logp_abs": LOGP_TOL, "tie_margin": TIE_TOL, "state_rel": STATE_TOL},
              "new_tokens": NEW_TOKENS}
    try:
        import train

        samples = train.ensure_data(args.data, 3407, progress=False)
        if args.skip_numerics:
            earlier = json.load(open(args.out)) if os.path.isfile(args.out) else {}
            result.update({k: earlier[k] for k in ("model", "numerics") if k in earlier})
            result["seconds_numerics"] = {k: v for k, v in earlier.get("seconds", {}).items()
                                          if k not in ("build cut-depth folder", "train.py step",
                                                       "eval.py on the checkpoint", "total")}
            result["train_eval"] = train_and_eval(work, args.data, args.eval_data, args.train_layers,
                                                  args.train_vision_depth, clock)
            return finish(args, result, clock, t0)
        folder = os.path.join(work, "qwen3b")
        config = real_3b_config(args.layers, args.vision_depth)
        with clock("build folder"):
            if not os.path.isfile(os.path.join(folder, "config.json")):  # a --work folder may hold it already
                build_qwen_folder(folder, seed=0, config=config, dtype=torch.bfloat16)
        with clock("load_policy bf16"):
            policy = load_policy(folder, dtype=torch.bfloat16)
        policy.model.eval()
        n_params = sum(p.numel() for p in policy.model.parameters())
        rotary = {str(b.dtype) for name, b in policy.model.named_buffers() if "inv_freq" in name}
        prompts = two_prompts(policy, args.data, samples)
        result["model"] = {"parameters": n_params, "layers": config.text_config.num_hidden_layers,
                           "vision_depth": config.vision_config.depth, "hidden": config.text_config.hidden_size,
                           "prompt_tokens": [len(p.input_ids) for p in prompts], "rotary_buffer_dtypes": sorted(rotary)}
        result["numerics"] = numerics(policy, prompts, clock)
        del policy
        if args.work is None:
            shutil.rmtree(folder)  # 7 GB: gone before the next model is built
        if not args.skip_train:
            result["train_eval"] = train_and_eval(work, args.data, args.eval_data, args.train_layers,
                                                  args.train_vision_depth, clock)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return finish(args, result, clock, t0)


def finish(args, result: dict, clock, t0: float) -> int:
    """Time, memory and the verdict into --out (atomically) and on stdout."""
    result["seconds"] = clock.seconds | {"total": round(time.perf_counter() - t0, 1)}
    result["peak_rss_gb"] = peak_rss_gb()
    result["ok"] = result.get("numerics", {"ok": False})["ok"] and result.get("train_eval", {"ok": True})["ok"]
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"[realwidth] {'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'}; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
