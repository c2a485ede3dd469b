"""How often each stage of the ExpCoT's staged scan fires, per family, on anomalous and on normal series.

    python bench/expcot_rates.py --data data/val                        # the validation split (seed 7)
    python bench/expcot_rates.py --suite anomllm --per-family 100 --seed 7   # a fresh generation, no files

Stages (expert_cot.StagedScan, method.md §6), as the Observation of each trace runs them:
  global     the global scan fires: robust |z| above the trigger or histogram-isolated points
  period     the period test fires: a clear cycle whose sliding-window period is unstable
  slope      the slope test fires: a sustained change of the cycle-averaged slope (expert_cot.slope_change)
  pattern    the pattern scan runs (no global hit and a stable structure, or the true type's evidence needs it)
  discord    the pattern scan finds a discord
and per family the share of traces that skip a stage but quote its result (tests/test_expert_cot.py
skipped_but_quoted; 0 is the target). Writes bench/results/expcot_rates.json (--results to change).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_gen  # noqa: E402
import expert_cot as ec  # noqa: E402
from tests.test_expert_cot import skipped_but_quoted  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402

STAGES = ("global", "period", "slope", "pattern", "discord")


def stage_record(item) -> dict:
    """The stages one series' trace runs and fires, and whether the trace skips a stage it quotes."""
    family, series, intervals, label = item
    x = np.asarray(series, dtype=float)
    scan = ec.StagedScan(x)
    trace = ec.expert_cot(x, intervals, label, scan=scan)
    pattern = ec.runs_pattern_scan(scan, label)
    return {"family": family, "anomalous": label != "normal", "global": scan.global_hit,
            "period": scan.period_hit, "slope": scan.slope_hit, "pattern": pattern,
            "discord": pattern and scan.discord.found, "incoherent": bool(skipped_but_quoted(trace))}


def load_items(args) -> list:
    """(family, series, intervals, label) of every series: from --data, or generated from --seed."""
    if args.data:
        return [(s.family, s.series, s.intervals, s.label if s.intervals else "normal")
                for s in data_gen.load_samples(args.data)]
    items = []
    for family in data_gen.SUITE_FAMILIES[args.suite]:
        for i in range(args.per_family):
            x, iv = data_gen.make_series(args.suite, family, i, args.seed)
            items.append((family, np.round(x, 5), iv, data_gen.FAMILY_LABEL[family] if iv else "normal"))
    return items


def rate_rows(records: list[dict]) -> list[dict]:
    """Per family and truth (anomalous / normal), then over all families: count and the share of series where
    each stage fires."""
    families = list(dict.fromkeys(r["family"] for r in records))
    rows = []
    for family in families + ["all"]:
        for anomalous in (True, False):
            sel = [r for r in records if family in ("all", r["family"]) and r["anomalous"] == anomalous]
            if sel:
                rows.append({"family": family, "truth": "anomalous" if anomalous else "normal", "n": len(sel),
                             **{k: float(np.mean([r[k] for r in sel])) for k in STAGES + ("incoherent",)}})
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| family | truth | n | global | period | slope | pattern scan | discord | skips and quotes |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['family']} | {r['truth']} | {r['n']} | "
                     + " | ".join(f"{100 * r[k]:.1f}" for k in STAGES + ("incoherent",)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="generated data folder (default: generate from --seed)")
    p.add_argument("--suite", default="anomllm", choices=data_gen.SUITES, help="suite to generate")
    p.add_argument("--per-family", type=int, default=100, help="series per family to generate")
    p.add_argument("--seed", type=int, default=7, help="generation seed (7: the validation split's)")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "expcot_rates.json"))
    args = p.parse_args(argv)
    items = load_items(args)
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            records = pool.map(stage_record, items, chunksize=16)  # in the order of items
    else:
        records = [stage_record(it) for it in items]
    rows = rate_rows(records)
    table = markdown(rows)
    print(f"Stage firing rates in % ({len(records)} series, "
          f"{args.data or f'{args.suite} seed {args.seed}, {args.per_family} per family'})\n\n{table}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    write_atomic(args.results, json.dumps({"source": args.data or {"suite": args.suite, "seed": args.seed,
                                                                   "per_family": args.per_family},
                                           "rows": rows, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
