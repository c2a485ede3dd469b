"""Shared pieces of the step benchmarks: a warmed-up tiny model and our RL loop driven step by step.

Both bench_step.py and bench_trl.py start from the same model: the embedded tiny Qwen2.5-VL after the
supervised format warm-up that `python train.py` runs first (so completions look like answers and the
reward is not zero everywhere). It is built once and kept in runs/bench/warm-tiny-<numbers>-s<seed>-…/.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from timerpo.algorithm import make_prompt  # noqa: E402
from timerpo.policy import load_policy, save_policy  # noqa: E402


@dataclass
class StepRecord:
    """One RL step as a benchmark sees it: wall seconds (everything from picking the prompts to the
    optimizer step), mean outcome reward, completion tokens sampled over `completions` completions, and per-phase seconds when known.
    `cpu` and `cpu_phases`: the same in CPU seconds of this process, which other processes on a shared machine
    inflate far less than wall time."""
    wall: float
    reward: float
    tokens: int
    completions: int
    phases: dict[str, float] = field(default_factory=dict)
    cpu: float = 0.0
    cpu_phases: dict[str, float] = field(default_factory=dict)


def tiny_flags() -> list[str]:
    """train.py's tiny preset spelled out as flags, warm-up excluded: a model folder alone would get the
    paper preset."""
    return [f for key, value in train.TINY.items() if not key.startswith("warmup")
            for f in ("--" + key.replace("_", "-"), str(value))]


def tiny_args(model_dir: str, data: str, seed: int, extra: list[str] = ()) -> "train.Config":
    """train.py's arguments for the tiny preset on a model folder, without warm-up. `extra` are further
    train.py flags, e.g. ["--advantage", "grpo"]."""
    flags = ["--model", model_dir, "--data", data, "--seed", str(seed), "--warmup-steps", "0"]
    return train.parse_args(flags + tiny_flags() + list(extra))


def warm_tiny(data: str, seed: int, warmup_steps: int, cache: str = os.path.join(ROOT, "runs", "bench"),
              vision_steps: int = train.TINY["warmup_vision_steps"]) -> str:
    """The tiny model after train.py's warm-up (`vision_steps` plot-reading, `warmup_steps` answer steps),
    saved once and reused."""
    folder = os.path.join(cache, f"warm-tiny-{train.TINY['tiny_numbers']}-s{seed}-v{vision_steps}-w{warmup_steps}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    args = train.parse_args(["--data", data, "--seed", str(seed), "--warmup-steps", str(warmup_steps),
                             "--warmup-vision-steps", str(vision_steps)])
    samples = train.ensure_data(data, 3407, progress=True)
    policy = load_policy("tiny", seed=seed, tiny_numbers=args.tiny_numbers)
    t0 = time.time()
    train.format_warmup(policy, args, samples, progress=True)
    print(f"[warm-up] {warmup_steps} steps in {time.time() - t0:.0f} s -> {folder}", flush=True)
    save_policy(policy, folder)
    return folder


class OurLoop:
    """Our RL loop (train.py's rl_step) on a fresh copy of `model_dir`, advanced one step at a time."""

    def __init__(self, model_dir: str, data: str, seed: int, extra: list[str] = ()):
        self.args = tiny_args(model_dir, data, seed, extra)
        self.samples = train.ensure_data(data, 3407, progress=False)
        self.policy = load_policy(model_dir, seed=seed)
        self.ref = train.make_reference(self.policy, model_dir, self.args) if self.args.beta > 0 else None
        self.optimizer = train.make_optimizer(self.policy, self.args)
        self.step = 0

    def run_step(self) -> StepRecord:
        a, t0, c0 = self.args, time.perf_counter(), time.process_time()
        indices = train.step_prompt_indices(len(self.samples), a.prompts_per_step, self.step, a.seed)
        prompts = [make_prompt(self.policy, a.data, self.samples, i, a.cot) for i in indices]
        episodes, _, _, timer = train.rl_step(self.policy, self.ref, self.optimizer, prompts, self.step, a)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.step += 1
        phases, cpu_phases = dict(timer.seconds), dict(timer.cpu_seconds)
        phases["other"] = wall - sum(phases.values())  # prompt building, scoring, advantages
        cpu_phases["other"] = cpu - sum(cpu_phases.values())
        return StepRecord(wall=wall, reward=sum(ep.reward.total for ep in episodes) / len(episodes),
                          tokens=sum(len(ep.completion_ids) for ep in episodes), completions=len(episodes),
                          phases=phases, cpu=cpu, cpu_phases=cpu_phases)


def step_bench_parser(doc: str, sides: str, results_name: str) -> argparse.ArgumentParser:
    """The flags bench_step.py and bench_trl.py share: repetitions of `sides` alternating, steps per
    repetition, the start model's warm-up, data, cache, seed and the results file."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help=f"repetitions per {sides}, alternating (3)")
    p.add_argument("--steps", type=int, default=10, help="RL steps per repetition (10)")
    p.add_argument("--warmup-steps", type=int, default=train.TINY["warmup_steps"],
                   help="answer warm-up steps of the start model (train.py's)")
    p.add_argument("--warmup-vision-steps", type=int, default=train.TINY["warmup_vision_steps"],
                   help="plot-reading warm-up steps of the start model (train.py's)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "train"), help="training data folder")
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench"), help="where the warmed-up model is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the start model and of the loops")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", results_name),
                   help="where the json goes")
    return p


def machine_load() -> dict:
    """The machine as a benchmark found it: CPU count and the 1/5/15-minute load averages. A load average above
    the CPU count means other processes competed for the cores, so wall times are inflated (CPU times less)."""
    cpus = os.cpu_count() or 1
    load = os.getloadavg()
    return {"cpus": cpus, "loadavg": [round(x, 2) for x in load], "under_load": load[0] > 0.75 * cpus}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
