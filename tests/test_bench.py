"""One-step smoke runs of the benchmark scripts: they run end to end and write what they promise.

The benchmarks themselves (timings) are never run in CI; these only keep the scripts from rotting.
"""
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_step_smoke(tiny_data, tmp_path):
    out = tmp_path / "step.json"
    run_script(["bench/bench_step.py", "--reps", "1", "--steps", "2", "--warmup-steps", "1", "--warmup-vision-steps", "1", "--data", tiny_data,
                "--cache", str(tmp_path), "--results", str(out)])
    report = json.loads(out.read_text())
    prof = report["profile"]
    assert set(prof) == {"timerpo", "grpo"}
    for mode, p in prof.items():
        assert p["steps"] == 1  # the first step of the repetition is left out
        for key in ("", "_cpu"):  # wall and CPU seconds: the phases account for the whole step
            phases = sum(p[f"{ph}{key}_s"] for ph in ("rollout", "reference", "grounding", "update", "other"))
            assert math.isclose(phases, p[f"step{key}_s"], rel_tol=1e-6)
        assert 0 < p["step_cpu_s"]
        assert 1 <= p["completion_tokens"] <= 72
    assert prof["timerpo"]["grounding_s"] > 0 and prof["grpo"]["grounding_s"] == 0
    assert report["extra_cost_cpu"]["step_ratio"] > 0 and isinstance(report["machine"]["under_load"], bool)
    assert len(report["machine"]["before"]["loadavg"]) == 3


def test_bench_trl_smoke(tiny_data, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "peer.json"
    stdout = run_script(["bench/bench_trl.py", "--reps", "1", "--steps", "2", "--warmup-steps", "1", "--warmup-vision-steps", "1",
                         "--data", tiny_data, "--cache", str(tmp_path), "--results", str(out)])
    report = json.loads(out.read_text())
    assert "ratio ours/TRL" in stdout
    for side in ("ours", "trl"):
        assert report[side]["steps_timed"] == 1
        assert 1 <= report[side]["mean_completion_tokens"] <= 72
        assert 0 <= report[side]["mean_reward"] <= 1
    assert math.isfinite(report["ratio_median_s_per_step"]) and report["ratio_median_s_per_step"] > 0


def test_ablation_smoke(tiny_data, tmp_path):
    results = tmp_path / "results"
    run_script(["bench/ablation.py", "--seeds", "0", "--steps", "1", "--arms", "timerpo", "grpo",
                "--data", tiny_data, "--eval-data", tiny_data, "--eval-limit", "4", "--out", str(tmp_path / "runs"),
                "--results", str(results),
                "--train-args", "--warmup-steps 1 --warmup-vision-steps 1 --eval-samples 4 --max-new-tokens 8 --prompts-per-step 2"])
    report = json.loads((results / "ablation.json").read_text())
    assert set(report["arms"]) == {"timerpo", "grpo"}
    for arm in report["arms"].values():
        assert len(arm["Avg F1"]["values"]) == 1 and arm["Avg F1"]["std"] == 0
    assert (results / "ablation_curves.png").stat().st_size > 0
    grpo = report["paired"]["grpo"]
    assert set(grpo) == {"Avg F1", "Loc gain", "Cls Acc"}
    for d in grpo.values():  # one seed: the interval is that seed's difference
        assert len(d["per_seed"]) == 1 and d["ci95"] == [d["mean"]] * 2 == [d["per_seed"][0]] * 2
    # the grpo arm started from the timerpo arm's post-warm-up model
    config = json.loads((tmp_path / "runs" / "grpo-s0" / "run_config.json").read_text())
    assert config["model"].endswith(os.path.join("timerpo-s0", "reference")) and config["warmup_steps"] == 0


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    """Oracle: for 5 values every one of the 5^5 equally likely resamples enumerated, and the 2.5 / 97.5 %
    quantiles of their means; 40,000 random resamples must land within 2 % of the values' range of them."""
    import itertools

    from bench.ablation import bootstrap_interval

    values = [3.0, -1.5, 7.25, 0.5, 12.0]
    means = sorted(sum(values[i] for i in pick) / 5 for pick in itertools.product(range(5), repeat=5))
    exact = (means[int(0.025 * len(means))], means[int(0.975 * len(means)) - 1])
    lo, hi = bootstrap_interval(values, resamples=40_000)
    width = max(values) - min(values)
    assert abs(lo - exact[0]) < 0.02 * width and abs(hi - exact[1]) < 0.02 * width
    assert bootstrap_interval([2.0] * 8) == (2.0, 2.0)  # no spread, no interval
    wide, narrow = bootstrap_interval(values, level=0.99), bootstrap_interval(values, level=0.5)
    assert wide[0] < lo < narrow[0] < narrow[1] < hi < wide[1]


def test_pointing_probe_sums_each_columns_rows():
    """Oracle: a hand-built batch, 2 rows x 3 columns of image tokens at positions 2..7 (row-major)."""
    from bench.pointing_probe import column_attention

    weights = torch.arange(100, dtype=torch.float64).view(10, 10)  # [T, T]
    ids = torch.tensor([[1, 1, 7, 7, 7, 7, 7, 7, 1, 1]])
    batch = SimpleNamespace(input_ids=ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    expected = [weights[8, 2 + c] + weights[8, 5 + c] for c in range(3)]
    assert column_attention(weights, batch, 8, image_id=7).tolist() == [float(x) for x in expected]


def test_pointing_probe_smoke(tiny_data, tiny_policy, tmp_path):
    from timerpo.policy import save_policy

    save_policy(tiny_policy, str(tmp_path / "model"))
    out = tmp_path / "probe.json"
    run_script(["bench/pointing_probe.py", "--model", str(tmp_path / "model"), "--data", tiny_data, "--limit", "4",
                "--max-new-tokens", "8", "--results", str(out)])
    report = json.loads(out.read_text())
    assert report["plots"] == 4 and report["boundary_tokens"] >= 0
    assert set(report) >= {"looks_at_written_column", "looks_at_a_true_boundary_column", "chance_truth"}


def test_bench_sinkhorn_smoke(tmp_path):
    try:  # POT's import name is `ot`, which the project's ot.py shadows here: ask the installed metadata
        importlib.metadata.version("POT")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("POT is not installed (pip install -r requirements-dev.txt)")
    out = tmp_path / "sinkhorn.json"
    run_script(["bench/bench_sinkhorn.py", "--smoke", "--results", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["hidden_states"] for r in rows] == ["random", "structured", "tokenlike"]
    assert all(r["max_abs_dW_vs_pot"] < 1e-6 for r in rows)  # POT is the oracle of both Sinkhorns
    assert all(r["max_abs_dW_reference_vs_pot"] < 1e-6 for r in rows)


# method.md §4: anomaly-free share and intervals per series of the four interval processes; the other
# families share their clean family's process.
SHARE_COUNT = {"range": (0.30, 1.1), "point": (0.29, 1.2), "freq": (0.10, 2.2), "trend": (0.55, 0.45)}
PROCESS = {"range": "range", "point": "point", "freq": "freq", "trend": "trend", "flat-trend": "trend",
           "noisy-point": "point", "noisy-freq": "freq", "noisy-trend": "trend"}


def data_gen_table(stdout: str) -> tuple[dict, dict]:
    """bench_data_gen.py's table as {family: (n, [(value, reference, mark)] for share %, count, length)}, and
    its process expectations as {process: mean interval length}."""
    rows, lengths = {}, {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0].split()[0] in PROCESS:
            family, n = parts[0].split()
            cells = [cell.split() for cell in parts[1:]]
            rows[family] = (int(n), [(float(v.rstrip("%")), float(r.rstrip("%")), m) for v, r, m in cells])
        elif line.strip().startswith("process expectation"):
            words = line.replace(":", " ").split()
            lengths[words[2]] = float(words[words.index("length") + 1])
    return rows, lengths


def write_interval_data(folder, free: dict, intervals: dict, length: dict, per_family: int = 20):
    """A data folder whose statistics are known: per family, `free[f]` samples without anomaly, then
    `intervals[f]` intervals of `length[f]` steps spread over the other samples (one image for all)."""
    import data_gen
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"))
    Image.new("RGB", (8, 8), "white").save(os.path.join(folder, "images", "blank.png"))
    lines = []
    for family in PROCESS:
        anomalous = per_family - free[family]
        for k in range(per_family):
            j = k - free[family]  # index among the anomalous samples
            n = 0 if j < 0 else intervals[family] // anomalous + (j < intervals[family] % anomalous)
            spans = [[10 + i * (length[family] + 10), 10 + i * (length[family] + 10) + length[family]]
                     for i in range(n)]
            lines.append(json.dumps({"id": f"{family}-{k}", "family": family,
                                     "label": data_gen.FAMILY_LABEL[family] if spans else "normal",
                                     "length": 1000, "intervals": spans, "series": [0.0] * 1000,
                                     "image": "images/blank.png", "expcot": "", "gencot": ""}))
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_data_gen_bench(args):
    proc = subprocess.run([sys.executable, "bench/bench_data_gen.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, *data_gen_table(proc.stdout), proc.stdout


def test_bench_data_gen_smoke(tmp_path):
    """Three runs whose verdict is known beforehand. (1) Generating 2 series per family fails the table
    (exit 1): a share of 0, 1/2 or 1 is 20 points from range's 30 % and point's 29 %, 10 from freq's 10 %.
    (2) A folder built with the reference share, count and length of every family passes it (exit 0), and
    the table prints the values it was built with. (3) The same folder with every point series anomalous
    fails on that one cell (exit 1)."""
    code, rows, lengths, stdout = run_data_gen_bench(["--per-family", "2"])
    assert code == 1 and "generated 16 samples" in stdout
    assert set(rows) == set(PROCESS) and set(lengths) == set(SHARE_COUNT)
    for family, (n, [(share, share_ref, mark), (_, count_ref, _), _]) in rows.items():
        assert n == 2 and share in (0.0, 50.0, 100.0)
        assert (share_ref / 100, count_ref) == SHARE_COUNT[PROCESS[family]]
        if PROCESS[family] != "trend":
            assert mark == "FAIL", family

    free = {f: round(20 * SHARE_COUNT[p][0]) for f, p in PROCESS.items()}
    count = {f: round(20 * SHARE_COUNT[p][1]) for f, p in PROCESS.items()}
    length = {f: round(lengths[p]) for f, p in PROCESS.items()}
    write_interval_data(tmp_path / "matching", free, count, length)
    code, rows, _, _ = run_data_gen_bench(["--data", str(tmp_path / "matching")])
    assert code == 0
    for family, (n, cells) in rows.items():
        assert n == 20 and [mark for _, _, mark in cells] == ["ok"] * 3
        assert [value for value, _, _ in cells] == pytest.approx(
            [100 * free[family] / 20, count[family] / 20, length[family]], abs=0.051)

    write_interval_data(tmp_path / "no-free-point", {**free, "point": 0}, count, length)
    code, rows, _, _ = run_data_gen_bench(["--data", str(tmp_path / "no-free-point")])
    assert code == 1
    assert {(f, k) for f, (_, cells) in rows.items() for k, (_, _, mark) in enumerate(cells) if mark != "ok"} \
        == {("point", 0)}


def test_answer_figure_smoke(tiny_data, tmp_path):
    """One tile, then the same sample's answer from a second eval folder drawn below it under its label."""
    from PIL import Image
    for name in ("full", "random"):
        run_script(["eval.py", "--model", f"baseline:{name}", "--data", tiny_data, "--out", str(tmp_path / name),
                    "--no-progress"])
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    stdout = run_script(["bench/answer_figure.py", "--eval-dir", str(tmp_path / "full"), "--data", tiny_data,
                         "--family", "range", "--out", str(one)])
    assert "-range-" in stdout  # a sample of the asked family
    stdout = run_script(["bench/answer_figure.py", "--eval-dir", str(tmp_path / "full"), "--beside",
                         str(tmp_path / "random"), "--label", "whole series", "--beside-label", "random windows",
                         "--data", tiny_data, "--family", "range", "--out", str(two)])
    assert stdout.count("aff-F1") == 2  # both answers of the same sample were scored
    with Image.open(one) as a, Image.open(two) as b:
        assert a.size[0] >= 1000  # the whole plot, not a thumbnail
        assert b.size[0] == a.size[0] and b.size[1] > 2 * a.size[1]  # two labelled tiles, one below the other


def test_gpu_bench_smoke(tiny_data, tmp_path):
    """bench/gpu_bench.py --smoke: the GPU benchmark's path (rollout variants, update MFU) on the CPU, tiny config.
    The compiled variant is left out here (tests/test_rollout.py checks the compiled step)."""
    out = tmp_path / "gpu.json"
    run_script(["bench/gpu_bench.py", "--smoke", "--variants", "fp32-eager", "bf16-eager", "--data", tiny_data,
                "--results", str(out)])
    report = json.loads(out.read_text())
    rows = report["rollout"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("fp32-eager", 4), ("bf16-eager", 4), ("fp32-eager", 8),
                                                         ("bf16-eager", 8)]
    for r in rows:
        assert "error" not in r and 0 < r["tokens"] <= r["completions"] * 4  # at most 4 new tokens each
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
    update = report["update"]
    assert update["completions"] == 4 and update["tflop"] > 0 and update["mfu"] is None  # no GPU peak on a CPU
    assert math.isfinite(update["loss"])


# An "earlier checkout" whose rollout writes other completions: one end token per row.
LONE_END_TOKENS = """
def sample_completions(policy, prompts, seeds, max_new_tokens, temperature=1.0, with_states=False):
    return [([policy.end_ids[0]], [0.0]) + ((None,) if with_states else ()) for _ in prompts]
"""


def test_bench_rollout_smoke(tiny_data, tmp_path):
    """bench_rollout.py against two stand-ins for an earlier checkout. tests/generate_sampler.py samples with
    transformers' own generate, driven by the same draws: the report must find the same completions. A
    rollout that writes one end token per row: the report must find different ones."""
    for name, source in (("generate", open(os.path.join(ROOT, "tests", "generate_sampler.py")).read()),
                         ("lone-end", LONE_END_TOKENS)):
        os.makedirs(tmp_path / name / "timerpo")
        (tmp_path / name / "timerpo" / "rollout.py").write_text(source)
        out = tmp_path / f"{name}.json"
        stdout = run_script(["bench/bench_rollout.py", "--before", str(tmp_path / name), "--reps", "1", "--steps",
                             "1", "--warmup-vision-steps", "1", "--warmup-steps", "1", "--data", tiny_data,
                             "--cache", str(tmp_path), "--results", str(out)])
        report = json.loads(out.read_text())
        assert set(report["sides"]) == {"ours", "before"} and "ratio ours/before" in stdout
        assert report["same_completions"] is (name == "generate"), name


def test_expcot_rates_smoke(tmp_path):
    out = tmp_path / "rates.json"
    stdout = run_script(["bench/expcot_rates.py", "--suite", "tods", "--per-family", "2", "--workers", "1",
                         "--results", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert "| family | truth | n | global |" in stdout
    assert [r["family"] for r in rows] == ["global", "contextual", "seasonal", "trend", "shapelet", "all"]
    assert all(r["truth"] == "anomalous" and r["n"] == (10 if r["family"] == "all" else 2) for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("global", "period", "slope", "pattern", "discord"))
