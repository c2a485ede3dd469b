"""How much of the within-group spread of the grounded reward s = exp(-W/tau) is noise?

    python bench/grounding_noise.py --data data/val --groups 24

Â_TsR divides s - mean_G s by std_G s (the paper's reading). That is only safe when the spread is real.
On the warmed-up tiny model this samples G completions for each of --groups plots, then computes W three
ways from the same completions:
  * as training does: states kept by the rollout, 50 Sinkhorn iterations;
  * Sinkhorn converged (--ref-iters iterations), same states: the truncation error of 50 iterations;
  * 50 iterations on states from a separate full forward: the float noise of the kept states.
It prints the mean within-group std of s and of W beside the mean |difference| of each error source, and
the share of groups whose std of s falls below several floors. Writes bench/results/grounding_noise.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import tiny_flags, warm_tiny  # noqa: E402  (also puts the repository root on the path)

import data_gen  # noqa: E402
import train  # noqa: E402
from timerpo.algorithm import grounding_values, make_prompt, rollout, score_outcomes, target_states  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import load_policy  # noqa: E402
from timerpo.rollout import collate, completion_forward  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402


def distances(states, lengths, targets, rows, eps, iters) -> np.ndarray:
    hidden = pad_sequence(states, batch_first=True)  # [N, C, D]
    mask = (torch.arange(hidden.shape[1]) < torch.tensor(lengths)[:, None]).long()  # [N, C]
    t_states, t_mask = targets
    return grounding_values(hidden, mask, t_states[rows], t_mask[rows], "ot", eps, iters).double().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/val", help="plots to sample on (not the test split)")
    p.add_argument("--model", default=None, help="model folder (default: the tiny model after its warm-up)")
    p.add_argument("--groups", type=int, default=24, help="prompts, each with G completions")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (training: 1)")
    p.add_argument("--ref-iters", type=int, default=2000, help="Sinkhorn iterations of the converged reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="bench/results/grounding_noise.json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = args.model or warm_tiny(args.data, args.seed, train.TINY["warmup_steps"])
    cfg = train.parse_args(["--model", model, "--data", args.data, "--seed", str(args.seed)] + tiny_flags())
    policy = load_policy(model, seed=args.seed)
    samples = data_gen.load_samples(args.data)
    prompts = [make_prompt(policy, args.data, samples, i, "expcot")
               for i in data_gen.balanced_indices(samples, args.groups)]
    G = cfg.group_size
    episodes = rollout(policy, prompts, group_size=G, step=0, seed=args.seed, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.rollout_batch, temperature=args.temperature, keep_states=True)
    score_outcomes(episodes, loc_mode=cfg.loc_reward)
    targets = target_states(policy, prompts, max_tokens=cfg.expcot_max_tokens)
    rows = torch.tensor([ep.group for ep in episodes])
    lengths = [len(ep.completion_ids) for ep in episodes]
    kept = [ep.states for ep in episodes]
    with torch.no_grad():
        batch = collate(policy, [ep.prompt.encoded for ep in episodes], [ep.completion_ids for ep in episodes])
        _, hidden, _ = completion_forward(policy, batch, with_hidden=True)  # [N, C, D]
    forward = [hidden[i, :n] for i, n in enumerate(lengths)]
    w = {"train": distances(kept, lengths, targets, rows, cfg.ot_eps, cfg.ot_iters),
         "converged": distances(kept, lengths, targets, rows, cfg.ot_eps, args.ref_iters),
         "forward": distances(forward, lengths, targets, rows, cfg.ot_eps, cfg.ot_iters)}
    s = {k: np.exp(-v / cfg.tau) for k, v in w.items()}
    std_s = s["train"].reshape(-1, G).std(axis=1, ddof=1)  # [groups]
    std_w = w["train"].reshape(-1, G).std(axis=1, ddof=1)
    rewards = np.array([ep.reward.total for ep in episodes]).reshape(-1, G)
    out = {
        "model": model, "groups": args.groups, "G": G,
        "W_std_in_group": float(std_w.mean()), "s_std_in_group": float(std_s.mean()),
        "s_std_in_group_min": float(std_s.min()),
        "sinkhorn_truncation_abs_s": float(np.abs(s["train"] - s["converged"]).mean()),
        "state_float_noise_abs_s": float(np.abs(s["train"] - s["forward"]).mean()),
        "zero_std_reward_groups": float(np.mean(rewards.max(1) == rewards.min(1))),
        "share_of_groups_with_s_std_below": {str(f): float(np.mean(std_s < f)) for f in (1e-4, 1e-3, 1e-2, 0.05)},
    }
    # Token-identical completions of one group: any difference of their s is noise, and "std" scales it up.
    dup = [abs(s["train"][i] - s["train"][j]) for g in range(len(prompts)) for i in range(g * G, g * G + G)
           for j in range(i + 1, g * G + G) if episodes[i].completion_ids == episodes[j].completion_ids]
    out["identical_completion_pairs"] = len(dup)
    out["identical_pairs_abs_s_diff_max"] = float(max(dup)) if dup else None
    all_same = [g for g in range(len(prompts))
                if all(episodes[g * G + k].completion_ids == episodes[g * G].completion_ids for k in range(G))]
    out["groups_all_identical"] = len(all_same)
    if all_same:  # what the paper's "std" reading makes of them: |Â_TsR| before α
        z = [np.abs((s["train"][g * G:(g + 1) * G] - s["train"][g * G:(g + 1) * G].mean())
                    / (s["train"][g * G:(g + 1) * G].std(ddof=1) + 1e-6)).max() for g in all_same]
        out["all_identical_groups_max_abs_tsr_std"] = float(max(z))
    noise = max(out["sinkhorn_truncation_abs_s"], out["state_float_noise_abs_s"])
    out["spread_over_noise"] = out["s_std_in_group"] / max(noise, 1e-300)
    for k, v in out.items():
        print(f"{k:36s} {v}")
    write_atomic(args.results, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
