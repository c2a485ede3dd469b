"""train.py end to end on the tiny model: a short run, exact resume, crash-safe checkpoints that load
without running code, clean errors."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import train
from tests.planted import make_genuine_older_format, make_malicious_older_format, payload, plant_pickles
from timerpo.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"time_rollout", "time_forward", "time_grounding", "time_update", "time_step", "tokens_per_s"}


def small_args(data, out, name, steps, extra=()):
    return ["--data", data, "--eval-data", data, "--out", str(out), "--name", name, "--steps", str(steps),
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "10", "--warmup-steps", "3", "--warmup-vision-steps", "2",
            "--eval-samples", "4", "--eval-every", "2", "--save-every", "1", "--micro-batch", "4",
            "--rollout-batch", "6", "--expcot-max-tokens", "48", "--no-progress", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train.main(small_args(tiny_data, out, "full", 3)) == 0
    return out / "full"


def test_short_run_writes_logs_curves_and_checkpoints(full_run):
    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_fmt", "reward_cls", "reward_loc", "zero_std_frac", "adv_std", "proj_coef",
                "grounding_mean", "kl", "entropy", "clip_frac", "completion_len", "time_rollout", "time_forward",
                "time_grounding", "time_update"):
        assert key in rows[0], key
    evals = read_jsonl(full_run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]  # start of RL, every 2 steps, and the end
    for key in ("avg_group_f1", "loc_gain", "class_window_avg_f1", "pw_f1_anomalous"):  # tests/test_eval.py: values
        assert key in evals[0], key
    assert evals[0]["loc_gain"] == pytest.approx(evals[0]["avg_group_f1"] - evals[0]["class_window_avg_f1"])
    assert (full_run / "curves.png").stat().st_size > 0
    assert latest_checkpoint(str(full_run)).endswith("ckpt-000003")


@pytest.fixture(scope="module")
def cut_run(tiny_data, tmp_path_factory):
    """The same run stopped after 2 of its 3 steps; tests resume copies of it."""
    out = tmp_path_factory.mktemp("cut")
    assert train.main(small_args(tiny_data, out, "cut", 2)) == 0
    return out / "cut"


def assert_resumed_exactly(run_dir, full_run):
    resumed = read_jsonl(run_dir / "metrics.jsonl")
    straight = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key, value in straight[2].items():
        if key in TIMING_KEYS or value is None or isinstance(value, bool):
            continue
        assert resumed[2][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_planted_payload_runs_code_when_unpickled(tmp_path):
    """The payload of the tests below is live: the old loaders would have run it."""
    marker = tmp_path / "pwned"
    pickle.loads(payload(marker))
    assert marker.exists()
    marker.unlink()
    (tmp_path / "trainer_state.pt").write_bytes(payload(marker))
    with pytest.raises(Exception):
        torch.load(tmp_path / "trainer_state.pt", weights_only=False)  # the old load_trainer_state
    assert marker.exists()


def test_resume_continues_exactly_and_reads_no_pickle(tiny_data, tmp_path, cut_run, full_run):
    shutil.copytree(cut_run, tmp_path / "cut")
    marker = tmp_path / "pwned"
    plant_pickles(tmp_path / "cut", marker)
    assert train.main(small_args(tiny_data, tmp_path, "cut", 3, ["--resume"])) == 0
    assert not marker.exists()
    assert_resumed_exactly(tmp_path / "cut", full_run)


def test_older_checkpoint_is_refused_and_runs_nothing(tiny_data, tmp_path, cut_run, capsys):
    shutil.copytree(cut_run, tmp_path / "cut")
    marker = tmp_path / "pwned"
    make_malicious_older_format(tmp_path / "cut", marker)
    assert train.main(small_args(tiny_data, tmp_path, "cut", 3, ["--resume"])) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0
    assert "pickles that can run any code" in err and "--trust-checkpoint" in err
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]  # nothing was run


def test_trusted_older_checkpoint_resumes_exactly(tiny_data, tmp_path, cut_run, full_run):
    shutil.copytree(cut_run, tmp_path / "cut")
    make_genuine_older_format(tmp_path / "cut")
    assert train.main(small_args(tiny_data, tmp_path, "cut", 3, ["--resume", "--trust-checkpoint"])) == 0
    assert_resumed_exactly(tmp_path / "cut", full_run)
    assert os.path.isfile(os.path.join(latest_checkpoint(str(tmp_path / "cut")), "trainer_state.json"))


KILL_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from timerpo.tiny import build_tiny_policy
import timerpo.checkpoint as ckpt
pol = build_tiny_policy(0)
opt = torch.optim.AdamW(pol.model.parameters())
ckpt.save_checkpoint({run!r}, 1, pol, opt)
def dying_save(*a, **k):
    os._exit(9)  # the process dies mid-checkpoint: no cleanup, no finally blocks
ckpt.save_trainer_state = dying_save  # the last file written before the rename
ckpt.save_checkpoint({run!r}, 2, pol, opt)
"""


def test_kill_during_checkpoint_keeps_previous_loadable(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=ROOT, run=run)], capture_output=True)
    assert proc.returncode == 9
    latest = latest_checkpoint(run)
    assert latest.endswith("ckpt-000001")
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(latest, "model"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_missing_qwen_weights_give_one_clear_sentence(tiny_data, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "qwen2.5-vl-3b",
                           "--data", tiny_data, "--eval-data", tiny_data, "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in proc.stderr and "huggingface-cli download" in proc.stderr


def test_bad_flag_is_rejected_clearly(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_saved_checkpoint_loads_and_trains_again(tiny_data, tmp_path, full_run):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model_dir = os.path.join(latest_checkpoint(str(full_run)), "model")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    args = small_args(tiny_data, tmp_path, "again", 1, ["--model", model_dir, "--warmup-steps", "0"])
    assert train.main(args) == 0
    assert read_jsonl(tmp_path / "again" / "metrics.jsonl")[0]["step"] == 1
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(latest_checkpoint(str(tmp_path / "again")), "model"))
    moved = any(not torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters()))
    assert moved


def test_training_data_of_an_older_expcot_is_recomputed(tiny_data, tmp_path, capsys):
    import data_gen

    folder = str(tmp_path / "old")
    shutil.copytree(tiny_data, folder)
    path = os.path.join(folder, "manifest.json")
    with open(path) as fh:
        manifest = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**manifest, "expcot_version": "1"}, fh)
    current = data_gen.load_samples(tiny_data)
    rows = [json.loads(line) for line in open(os.path.join(folder, "samples.jsonl"))]
    with open(os.path.join(folder, "samples.jsonl"), "w") as fh:
        fh.writelines(json.dumps({**r, "expcot": r["expcot"] + " (old text)"}) + "\n" for r in rows)
    fresh = train.ensure_data(folder, 11, False)
    assert "holds ExpCoT version 1" in capsys.readouterr().err
    assert [s.expcot for s in fresh] == [s.expcot for s in current]
    held_out = train.ensure_data(folder, 11, False, expcot=False)  # never grounded: left as stored
    assert all(s.expcot.endswith(" (old text)") for s in held_out)
