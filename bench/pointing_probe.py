"""Where does the pointing head look when the tiny model writes an interval end, and does the number follow?

    python bench/pointing_probe.py --model runs/tiny-timerpo-expcot-ot-s0 --data data/val --limit 200

The model answers `--limit` plots greedily (balanced over families). For every token of an answer boundary it
wrote on an anomalous series, the probe reads the attention of the pointing head (method.md §18: head 0 of the
language model's layer 1) at the position that predicts that token, summed over each token column's rows, and
reports how often its most-attended column is
  * the column of the number written there (boundary_columns' rule), and
  * a column of one of the true boundaries (the warm-up's column-wide truth),
against what choosing a column uniformly at random gives for each. A head that finds the truth while the
numbers do not follow it means the column it reads never reaches the answer.
Writes bench/results/pointing_probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_gen  # noqa: E402
from timerpo.algorithm import make_prompt  # noqa: E402
from timerpo.detection import resolve_model  # noqa: E402
from timerpo.evaluate import predict  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import load_policy  # noqa: E402
from timerpo.rollout import collate, completion_forward  # noqa: E402
from timerpo.warmup import boundary_columns, captured_attention, warmup_completion  # noqa: E402


def column_attention(weights: torch.Tensor, batch, query: int, image_id: int) -> torch.Tensor:
    """Attention of one head at `query`, summed over the rows of each token column. weights [T, T] → [cols]"""
    image = (batch.input_ids[0] == image_id).nonzero().squeeze(-1)  # [rows * cols], row-major
    grid = image.view(batch.image_grid_thw[0, 1].item() // 2, -1)  # [rows, cols]
    return weights[query, grid].sum(0)


def probe(policy, prompts, predictions, layer: int, head: int) -> dict:
    """Counts over the boundary tokens of every parsable answer with intervals on an anomalous series."""
    end = policy.tokenizer.convert_ids_to_tokens(policy.end_ids[0])
    image_id = policy.token_id("<|image_pad|>")
    tokens = on_written = on_truth = 0
    chance_written, chance_truth = [], []
    with captured_attention(policy, layer) as seen, torch.no_grad():
        for prompt, pred in zip(prompts, predictions):
            sample = prompt.sample
            if not sample.intervals or not pred.parsed.intervals:
                continue
            text = pred.text + end
            batch = collate(policy, [prompt.encoded], [policy.tokenizer(text, add_special_tokens=False)["input_ids"]])
            completion_forward(policy, batch)
            truth = {c for _, c in boundary_columns(warmup_completion(sample, snap=True), policy.tokenizer,
                                                    sample.length)}  # the columns of the column-wide truth
            for j, written in boundary_columns(text, policy.tokenizer, sample.length):
                columns = column_attention(seen.output[1][0, head], batch, batch.prompt_len - 1 + j, image_id)
                looked = int(columns.argmax())
                tokens += 1
                on_written += looked == written
                on_truth += looked in truth
                chance_written.append(1 / len(columns))
                chance_truth.append(len(truth) / len(columns))
    share = lambda k: k / tokens if tokens else float("nan")  # noqa: E731
    return {"boundary_tokens": tokens, "looks_at_written_column": share(on_written),
            "looks_at_a_true_boundary_column": share(on_truth),
            "chance_written": float(np.mean(chance_written)) if tokens else float("nan"),
            "chance_truth": float(np.mean(chance_truth)) if tokens else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained tiny model folder or run folder")
    p.add_argument("--data", default="data/val", help="data folder (the validation split, not the test one)")
    p.add_argument("--limit", type=int, default=200, help="plots, balanced over families")
    p.add_argument("--layer", type=int, default=1, help="the pointing head's layer (train.py's: 1)")
    p.add_argument("--head", type=int, default=0, help="the pointing head (train.py's: 0)")
    p.add_argument("--max-new-tokens", type=int, default=72)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "pointing_probe.json"))
    args = p.parse_args(argv)
    policy = load_policy(resolve_model(args.model))  # a run folder: its latest checkpoint's model
    samples = data_gen.load_samples(args.data)
    prompts = [make_prompt(policy, args.data, samples, i, "expcot")
               for i in data_gen.balanced_indices(samples, args.limit)]
    predictions = predict(policy, prompts, args.max_new_tokens)
    report = {"model": args.model, "data": args.data, "plots": len(prompts), "layer": args.layer, "head": args.head,
              **probe(policy, prompts, predictions, args.layer, args.head)}
    print(json.dumps(report, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    write_atomic(args.results, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
