"""Does the tiny model's vision tower carry the plot? Linear probes and conditioning of its visual tokens.

    python bench/vision_probe.py --data data/val            # a validation split (seed 7), never the test one

For each image normalisation (Qwen's CLIP statistics, and the white-centred one the tiny preset uses) the
random-init tower encodes the plots once, then:
  * family probe: 8-way logistic regression on the pooled tokens (mean and std over the 190 positions),
    fitted on 3/4 of the plots, accuracy on the rest (chance 1/8);
  * column probe: logistic regression on each token column (mean over its rows), "does this column overlap
    an anomaly", balanced accuracy on held-out plots (chance 0.5);
  * conditioning: across-plot variance over squared mean, of the pooled tokens and of a token at a fixed
    position. A small ratio means every plot looks alike to the language model, whatever a probe can dig out.
Writes bench/results/vision_probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_gen  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import make_image_processor  # noqa: E402
from timerpo.tiny import TINY_IMAGE_MEAN, TINY_IMAGE_STD, build_tiny_policy  # noqa: E402

NORMS = {"qwen-clip": (None, None), "white-centred (tiny)": (TINY_IMAGE_MEAN, TINY_IMAGE_STD)}


def visual_tokens(policy, folder: str, samples: list) -> np.ndarray:
    """Merger outputs of every plot, as [N, rows, columns, D]."""
    out = []
    with torch.no_grad():
        for s in samples:
            with Image.open(os.path.join(folder, s.image)) as img:
                pix = policy.image_processor(images=[img.convert("RGB")], return_tensors="pt")
            tok = policy.model.model.visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
            tok = getattr(tok, "pooler_output", tok)  # [rows * columns, D]
            _, h, w = (int(v) // 2 for v in pix["image_grid_thw"][0])
            out.append(tok.reshape(h, w, -1).numpy())
    return np.stack(out)


def logistic_probe(x_fit, y_fit, x_test, classes: int, l2: float = 1e-3) -> np.ndarray:
    """Multinomial logistic regression (standardised features, L-BFGS); predicted classes of x_test."""
    x, xt = torch.tensor(x_fit, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)
    y = torch.tensor(y_fit)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return (xt @ w + b).argmax(1).numpy()


def column_labels(samples: list, columns: int) -> np.ndarray:
    """[N, columns]: 1 where a token column's time steps overlap a true interval."""
    left, _, plot_w, _ = data_gen.plot_box(data_gen.DEFAULT_WIDTH, data_gen.DEFAULT_HEIGHT)
    out = np.zeros((len(samples), columns), dtype=int)
    for i, s in enumerate(samples):
        for c in range(columns):
            lo = (c * data_gen.CELL - left) * s.length / plot_w
            hi = ((c + 1) * data_gen.CELL - left) * s.length / plot_w
            out[i, c] = any(min(e, hi) > max(st, lo) for st, e in s.intervals)
    return out


def probe(tokens: np.ndarray, samples: list, seed: int) -> dict:
    n = len(samples)
    order = np.random.default_rng(seed).permutation(n)
    fit, test = order[: 3 * n // 4], order[3 * n // 4:]
    families = sorted({s.family for s in samples})
    y = np.array([families.index(s.family) for s in samples])
    pooled = np.concatenate([tokens.mean((1, 2)), tokens.std((1, 2))], axis=1)  # [N, 2D]
    family_acc = float((logistic_probe(pooled[fit], y[fit], pooled[test], len(families)) == y[test]).mean())
    cols = tokens.mean(1)  # [N, W, D]
    lab = column_labels(samples, cols.shape[1])
    pred = logistic_probe(cols[fit].reshape(-1, cols.shape[-1]), lab[fit].reshape(-1),
                          cols[test].reshape(-1, cols.shape[-1]), 2)
    truth = lab[test].reshape(-1)
    balanced = 0.5 * ((pred[truth == 1] == 1).mean() + (pred[truth == 0] == 0).mean())
    flat = tokens.reshape(n, -1, tokens.shape[-1])  # [N, T, D]
    pooled_mean = flat.mean(1)  # [N, D]
    return {
        "family_probe_acc": family_acc,
        "column_probe_balanced_acc": float(balanced),
        "pooled_var_over_mean_sq": float(pooled_mean.var(0).sum() / (pooled_mean.mean(0) ** 2).sum()),
        "position_var_over_mean_sq": float((flat.var(0).sum(-1) / (flat.mean(0) ** 2).sum(-1)).mean()),
        "token_cosine_within_plot": float(np.mean([
            np.mean((f / np.linalg.norm(f, axis=1, keepdims=True)) @ (f / np.linalg.norm(f, axis=1, keepdims=True)).T)
            for f in flat[:20]])),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/val", help="a data folder that is not the test split (seed 7 here)")
    p.add_argument("--limit", type=int, default=400, help="plots used, balanced over families")
    p.add_argument("--seed", type=int, default=0, help="tiny weights and probe split")
    p.add_argument("--results", default="bench/results/vision_probe.json")
    args = p.parse_args(argv)
    samples = data_gen.load_samples(args.data)
    samples = [samples[i] for i in data_gen.balanced_indices(samples, args.limit)]
    rows = {}
    for name, (mean, std) in NORMS.items():
        policy = build_tiny_policy(args.seed)
        policy.image_processor = make_image_processor(mean, std)
        rows[name] = probe(visual_tokens(policy, args.data, samples), samples, args.seed)
        print(f"{name:22s} " + "  ".join(f"{k} {v:.3g}" for k, v in rows[name].items()), flush=True)
    write_atomic(args.results, json.dumps({"data": args.data, "n": len(samples), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
