"""One-step smoke runs of the benchmark scripts: they run end to end and write what they promise.

The benchmarks themselves (timings) are never run in CI; these only keep the scripts from rotting.
"""
import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest

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
    prof = json.loads(out.read_text())["profile"]
    assert set(prof) == {"timerpo", "grpo"}
    for mode, p in prof.items():
        assert p["steps"] == 1  # the first step of the repetition is left out
        phases = sum(p[f"{ph}_s"] for ph in ("rollout", "forward", "grounding", "update", "other"))
        assert math.isclose(phases, p["step_s"], rel_tol=1e-6)  # the phases account for the whole step
        assert 1 <= p["completion_tokens"] <= 72
    assert prof["timerpo"]["grounding_s"] > 0 and prof["grpo"]["grounding_s"] == 0


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
    # the grpo arm started from the timerpo arm's post-warm-up model
    config = json.loads((tmp_path / "runs" / "grpo-s0" / "run_config.json").read_text())
    assert config["model"].endswith(os.path.join("timerpo-s0", "reference")) and config["warmup_steps"] == 0


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


def test_bench_data_gen_smoke():
    proc = subprocess.run([sys.executable, "bench/bench_data_gen.py", "--per-family", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # exit 1 means "a share is outside its tolerance", expected with 2 series per family
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "range" in proc.stdout and "noisy-trend" in proc.stdout


def test_answer_figure_smoke(tiny_data, tmp_path):
    evald = tmp_path / "eval"
    run_script(["eval.py", "--model", "baseline:full", "--data", tiny_data, "--out", str(evald), "--no-progress"])
    png = tmp_path / "answer.png"
    stdout = run_script(["bench/answer_figure.py", "--eval-dir", str(evald), "--data", tiny_data,
                         "--family", "range", "--out", str(png)])
    assert "-range-" in stdout  # a sample of the asked family
    from PIL import Image
    with Image.open(png) as img:
        assert img.size[0] >= 1000  # the whole plot, not a thumbnail


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


def test_bench_rollout_smoke(tiny_data, tmp_path):
    out = tmp_path / "rollout.json"
    stdout = run_script(["bench/bench_rollout.py", "--before", ROOT, "--reps", "1", "--steps", "1", "--warmup-vision-steps", "1",
                         "--warmup-steps", "1", "--data", tiny_data, "--cache", str(tmp_path), "--results", str(out)])
    report = json.loads(out.read_text())
    assert set(report["sides"]) == {"ours", "before"} and "ratio ours/before" in stdout
    assert report["same_completions"]  # this checkout against itself


def test_expcot_rates_smoke(tmp_path):
    out = tmp_path / "rates.json"
    stdout = run_script(["bench/expcot_rates.py", "--suite", "tods", "--per-family", "2", "--workers", "1",
                         "--results", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert "| family | truth | n | global |" in stdout
    assert [r["family"] for r in rows] == ["global", "contextual", "seasonal", "trend", "shapelet", "all"]
    assert all(r["truth"] == "anomalous" and r["n"] == (10 if r["family"] == "all" else 2) for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("global", "period", "slope", "pattern", "discord"))
