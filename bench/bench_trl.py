"""Our loop (`--advantage grpo`) against TRL's GRPOTrainer: same model, data, reward, sizes and optimizer.

    python bench/bench_trl.py                     # 3 repetitions x 10 steps per side, alternating
    python bench/bench_trl.py --reps 1 --steps 2 --warmup-steps 1   # smoke run

Both sides start each repetition from the same warmed-up tiny Qwen2.5-VL (bench/common.py) and use
G = 5 completions for 4 prompts per step, at most 72 new tokens, temperature 1 with no top-k/top-p,
vision tokens banned from sampling, one policy update per rollout (μ = 1), clipped ratio ε = 0.2,
k3 KL to the start model with β = 0.001, entropy bonus 0.001, a token mean over the whole batch
(TRL's loss_type "dapo"), group advantages (r − mean)/(std + δ) (δ: ours 1e-6, TRL 1e-4), AdamW lr 1e-4,
weight decay 0.01, gradient clip 1.0, fp32 on CPU, no gradient checkpointing (TRL turns it on by default: we turn it off).
The reward is timerpo.reward.score_completion on the same samples. The prompts TRL builds with its
processor are checked token for token against ours before anything is timed.

Repetitions alternate which side goes first, so slow drifts of the machine hit both alike. The wall time of
a step runs from the end of the previous step to the end of this one (data loading, generation, scoring,
forwards, update and bookkeeping); the first step of every repetition is left out of the medians.
Prints one table and writes bench/results/peer_trl.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OurLoop, StepRecord, peak_rss_mb, step_bench_parser, tiny_args, warm_tiny  # noqa: E402

import data_gen  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import SYSTEM_PROMPT, encode_prompt, load_policy  # noqa: E402
from timerpo.prompt import build_prompt  # noqa: E402
from timerpo.reward import score_completion  # noqa: E402

# Our chat layout (timerpo/policy.py chat_text) as a Jinja template, so TRL's processor builds the same ids.
CHAT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_processor(policy):
    """A Qwen2.5-VL processor for the policy, without the video half (its constructor needs torchvision)."""
    from tests.qwen_folder import image_only_processor

    return image_only_processor(policy.image_processor, policy.tokenizer, CHAT_TEMPLATE)


def trl_dataset(data: str, samples: list):
    """Conversational prompts with the plot as an image column (decoded lazily, like ours)."""
    import datasets
    table = {"prompt": [[{"role": "user", "content": build_prompt(s.length)}] for s in samples],
             "image": [os.path.join(data, s.image) for s in samples], "index": list(range(len(samples)))}
    return datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())


def check_same_prompt(processor, policy, data: str, sample) -> None:
    """TRL's processor must produce exactly our prompt ids and pixels, or the comparison is void."""
    from PIL import Image
    with Image.open(os.path.join(data, sample.image)) as img:
        img = img.convert("RGB")
        conv = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": build_prompt(sample.length)}]}]
        theirs = processor.apply_chat_template([conv], add_generation_prompt=True, tokenize=True, return_dict=True)
        ours = encode_prompt(policy, img, build_prompt(sample.length))
    ids = theirs["input_ids"][0]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if ids != ours.input_ids or not torch.equal(torch.as_tensor(theirs["pixel_values"]), ours.pixel_values):
        raise SystemExit("TRL's processor builds a different prompt than ours: the benchmark would be void")


class TrlLoop:
    """TRL's GRPOTrainer with settings mirroring tiny_args; `run(steps)` trains and returns per-step records."""

    def __init__(self, model_dir: str, data: str, seed: int, steps: int, out_dir: str):
        from trl import GRPOConfig

        args = tiny_args(model_dir, data, seed, ["--advantage", "grpo"])
        self.samples = data_gen.load_samples(data)
        policy = load_policy(model_dir, seed=seed)
        self.processor = make_processor(policy)
        check_same_prompt(self.processor, policy, data, self.samples[0])
        banned = [[i] for i in policy.forbidden_ids]  # what our sampler masks out
        self.model_dir, self.dataset = model_dir, trl_dataset(data, self.samples)
        self.config = GRPOConfig(
            output_dir=out_dir, max_steps=steps, seed=seed, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            per_device_train_batch_size=args.prompts_per_step * args.group_size, num_generations=args.group_size,
            gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.max_new_tokens,
            temperature=1.0, top_k=0, top_p=1.0,
            generation_kwargs={"bad_words_ids": banned, "eos_token_id": policy.end_ids,
                               "pad_token_id": policy.tokenizer.pad_token_id},
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=args.weight_decay,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=args.max_grad_norm, beta=args.beta,
            epsilon=args.clip_eps, entropy_coef=args.entropy_coef, loss_type="dapo", scale_rewards="group",
            gradient_checkpointing=False, bf16=False)

    def reward(self, prompts, completions, index, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score_completion(t, self.samples[i].intervals, self.samples[i].label, self.samples[i].length)[1].total
                for t, i in zip(texts, index)]

    def run(self) -> list[StepRecord]:
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOTrainer

        ends = []

        class StepClock(TrainerCallback):
            def on_train_begin(self, *_, **__):
                ends.append(time.perf_counter())

            def on_step_end(self, *_, **__):
                ends.append(time.perf_counter())

        def outcome_reward(prompts, completions, index, **kw):  # TRL names the log column after the function
            return self.reward(prompts, completions, index, **kw)

        trainer = GRPOTrainer(model=self.model_dir, reward_funcs=outcome_reward, args=self.config,
                              train_dataset=self.dataset, processing_class=self.processor, callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; the table below says it all
        trainer.train()
        logs = [h for h in trainer.state.log_history if "reward" in h]
        n = self.config.per_device_train_batch_size
        return [StepRecord(wall=end - start, reward=float(h["reward"]), tokens=round(h["completions/mean_length"] * n),
                           completions=n)
                for start, end, h in zip(ends, ends[1:], logs)]


def summarize(records: list[list[StepRecord]]) -> dict:
    """Medians over steps 2.. of every repetition; rewards and tokens over all steps."""
    timed = [r for rep in records for r in rep[1:]] or [r for rep in records for r in rep]
    every = [r for rep in records for r in rep]
    walls = [r.wall for r in timed]
    return {"median_s_per_step": statistics.median(walls), "mean_s_per_step": statistics.fmean(walls),
            "ms_per_token": 1000 * sum(walls) / max(1, sum(r.tokens for r in timed)),
            "mean_reward": statistics.fmean(r.reward for r in every),
            "mean_completion_tokens": sum(r.tokens for r in every) / sum(r.completions for r in every),
            "steps_timed": len(timed), "walls": walls, "rewards": [r.reward for r in every]}


def main() -> int:
    args = step_bench_parser(__doc__, "side", "peer_trl.json").parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is a benchmark-only dependency: pip install -r requirements-dev.txt")
    model_dir = warm_tiny(args.data, args.seed, args.warmup_steps, args.cache, args.warmup_vision_steps)
    runs = {"ours": [], "trl": []}
    for rep in range(args.reps):
        for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
            t0 = time.time()
            if side == "ours":
                loop = OurLoop(model_dir, args.data, args.seed, ["--advantage", "grpo"])
                records = [loop.run_step() for _ in range(args.steps)]
            else:
                records = TrlLoop(model_dir, args.data, args.seed, args.steps,
                                  os.path.join(args.cache, "trl-out")).run()
            runs[side].append(records)
            print(f"[rep {rep + 1}/{args.reps}] {side:4s}: {args.steps} steps in {time.time() - t0:.1f} s, "
                  f"median {statistics.median(r.wall for r in records):.2f} s/step", flush=True)
    ours, theirs = summarize(runs["ours"]), summarize(runs["trl"])
    ratio = ours["median_s_per_step"] / theirs["median_s_per_step"]
    rows = [("median s/step", "median_s_per_step", "{:.2f}"), ("mean s/step", "mean_s_per_step", "{:.2f}"),
            ("ms per completion token", "ms_per_token", "{:.1f}"), ("mean reward", "mean_reward", "{:.3f}"),
            ("mean completion tokens", "mean_completion_tokens", "{:.1f}")]
    print(f"\n| ({args.reps} reps x {args.steps} steps, torch threads {torch.get_num_threads()}) | ours | TRL |")
    print("|---|---|---|")
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} |")
    print(f"\nratio ours/TRL (median s/step): {ratio:.2f}   peak RSS of the process {peak_rss_mb():.0f} MiB")
    report = {"args": vars(args), "trl_version": trl.__version__, "torch_threads": torch.get_num_threads(),
              "ratio_median_s_per_step": ratio, "ours": ours, "trl": theirs}
    write_atomic(args.results, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
