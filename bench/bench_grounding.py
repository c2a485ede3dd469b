"""Where TimerPO's grounding phase spends its time, on one real step of train.py's tiny defaults.

    python bench/bench_grounding.py                  # 20 repetitions of the phase, its parts timed apart
    python bench/bench_grounding.py --repeat 50 --values w.json   # also write W and the advantages

One step of the warmed-up tiny model (bench/common.py): 4 prompts x 5 completions sampled with their states
kept, exactly as train.rl_step does. Then the grounding phase (target_states + ground_completions) runs
`--repeat` times on those same completions, and each of its parts is timed on its own, in CPU seconds of this
process (one torch thread: the work done, which a shared machine inflates far less than wall time):
    text forward   the ExpCoT hidden states under the current policy (target_states), one padded batch
    cost           padding the completion states, the cosine cost matrix and the two marginals
    sinkhorn       50 float64 iterations (ot.sinkhorn_fast) and W = <T, C>
It also reports how much of each padded batch is padding. `--values` writes every episode's W and advantage,
so two checkouts can be compared value for value.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, OurLoop, machine_load, warm_tiny  # noqa: E402

import ot  # noqa: E402
import train  # noqa: E402
from timerpo.algorithm import (compute_advantages, ground_completions, make_prompt, rollout,  # noqa: E402
                               score_outcomes, target_states)



def one_step_episodes(loop: OurLoop):
    """Step 0 of the loop up to the grounding: prompts, rollout with states kept, outcome scores."""
    a = loop.args
    indices = train.step_prompt_indices(len(loop.samples), a.prompts_per_step, 0, a.seed)
    prompts = [make_prompt(loop.policy, a.data, loop.samples, i, a.cot) for i in indices]
    episodes = rollout(loop.policy, prompts, group_size=a.group_size, step=0, seed=a.seed,
                       max_new_tokens=a.max_new_tokens, batch_size=a.rollout_batch, keep_states=True)
    score_outcomes(episodes, loc_mode=a.loc_reward)
    return prompts, episodes


def cpu_seconds(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        out.append(time.process_time() - start)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=20, help="repetitions of the grounding phase (20)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "train"), help="training data folder")
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench"), help="where the warmed-up model is kept")
    p.add_argument("--warmup-steps", type=int, default=train.TINY["warmup_steps"], help="answer warm-up steps")
    p.add_argument("--warmup-vision-steps", type=int, default=train.TINY["warmup_vision_steps"],
                   help="plot-reading warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--values", default=None, help="write W and the advantages of the step here (JSON)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model_dir = warm_tiny(args.data, args.seed, args.warmup_steps, args.cache, args.warmup_vision_steps)
    loop = OurLoop(model_dir, args.data, args.seed)
    c = loop.args
    prompts, episodes = one_step_episodes(loop)
    kept = [ep.states for ep in episodes]

    def phase():
        for ep, states in zip(episodes, kept):
            ep.states = states
        targets = target_states(loop.policy, prompts, max_tokens=c.expcot_max_tokens)
        ground_completions(episodes, targets, micro_batch=c.micro_batch, grounding=c.grounding, ot_eps=c.ot_eps,
                           ot_iters=c.ot_iters)

    load_before = machine_load()
    whole = cpu_seconds(phase, args.repeat)
    targets = target_states(loop.policy, prompts, max_tokens=c.expcot_max_tokens)
    states, state_mask = targets
    hidden = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True).float()  # [b, C, D]
    lengths = torch.tensor([len(ep.completion_ids) for ep in episodes])
    mask = torch.arange(hidden.shape[1]) < lengths[:, None]  # [b, C]
    groups = torch.tensor([ep.group for ep in episodes])
    y, y_mask = states[groups].float(), state_mask[groups].bool()
    cost = ot.cosine_cost(hidden, y)
    a, b = ot.norm_softmax_marginal(hidden, mask), ot.norm_softmax_marginal(y, y_mask)
    parts = {
        "text forward": cpu_seconds(lambda: target_states(loop.policy, prompts, max_tokens=c.expcot_max_tokens),
                                    args.repeat),
        "cost": cpu_seconds(lambda: (ot.cosine_cost(hidden, y), ot.norm_softmax_marginal(hidden, mask),
                                     ot.norm_softmax_marginal(y, y_mask)), args.repeat),
        "sinkhorn": cpu_seconds(lambda: ot.sinkhorn_fast(cost, a, b, c.ot_eps, c.ot_iters).plan.mul_(cost).sum((1, 2)),
                                args.repeat),
    }
    load_after = machine_load()
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(f"grounding of one step: {len(episodes)} completions of {hidden.shape[1]} tokens at most against "
          f"{len(prompts)} ExpCoTs of {states.shape[1]} tokens at most; {torch.get_num_threads()} torch thread(s); "
          f"load average {load_before['loadavg'][0]:.1f} -> {load_after['loadavg'][0]:.1f} on {load_before['cpus']} CPUs")
    print(f"whole phase: median {1e3 * statistics.median(whole):.1f} ms CPU over {args.repeat} repetitions")
    for k, v in med.items():
        print(f"  {k:12s} {1e3 * v:6.1f} ms CPU")
    text_fill = float(state_mask.float().mean())
    pair_fill = float((mask[:, :, None] & y_mask[:, None, :]).float().mean())
    print(f"padding: ExpCoT batch {100 * (1 - text_fill):.0f} % pad tokens; cost/kernel matrices "
          f"{100 * (1 - pair_fill):.0f} % padded entries")
    if args.values:
        adv = compute_advantages(episodes, group_size=c.group_size, mode=c.advantage, alpha=c.alpha, norm=c.adv_norm,
                                 tau=c.tau, grounding=c.grounding, tsr_norm=c.tsr_norm, tsr_floor=c.tsr_floor)
        with open(args.values, "w") as f:
            json.dump({"W": [ep.grounding for ep in episodes], "advantages": adv.advantages.tolist()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
