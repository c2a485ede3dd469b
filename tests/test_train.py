"""train.py end to end on the tiny model: a short run and what it writes, exact resume with the run's own
settings, run folders that are never silently changed or lost, crash-safe checkpoints that load without
running code, clean errors."""
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.planted import make_genuine_older_format, make_malicious_older_format, payload, plant_pickles
from timerpo.checkpoint import latest_checkpoint, load_trainer_state, model_fingerprint
from timerpo.distributed import SINGLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"time_rollout", "time_reference", "time_grounding", "time_update", "time_step", "tokens_per_s"}


def small_args(data, out, name, steps, extra=()):
    return ["--data", data, "--eval-data", data, "--out", str(out), "--name", name, "--steps", str(steps),
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "10", "--warmup-steps", "3", "--warmup-vision-steps", "2",
            "--eval-samples", "4", "--eval-every", "2", "--save-every", "1", "--micro-batch", "4",
            "--rollout-batch", "6", "--expcot-max-tokens", "48", "--no-progress", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def folder_bytes(folder):
    """{relative path: sha256} of every file under folder: equal before and after means untouched."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0, err
    return err


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train.main(small_args(tiny_data, out, "full", 3, ["--report-to", "tensorboard"])) == 0
    return out / "full"


def test_short_run_writes_logs_curves_and_checkpoints(full_run):
    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_fmt", "reward_cls", "reward_loc", "zero_std_frac", "adv_std", "proj_coef",
                "grounding_mean", "kl", "entropy", "adv_tsr_perp_absmean", "completion_len", "unparsable_frac", "time_rollout",
                "time_reference", "time_grounding", "time_update"):
        assert key in rows[0], key
    evals = read_jsonl(full_run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]  # start of RL, every 2 steps, and the end
    for key in ("avg_group_f1", "loc_gain", "class_window_avg_f1", "pw_f1_anomalous"):  # tests/test_eval.py: values
        assert key in evals[0], key
    assert evals[0]["loc_gain"] == pytest.approx(evals[0]["avg_group_f1"] - evals[0]["class_window_avg_f1"])
    assert latest_checkpoint(str(full_run)).endswith("ckpt-000003")
    # --keep-checkpoints 0 (the default) keeps every checkpoint
    assert sorted(p.name for p in full_run.glob("ckpt-*")) == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]


def documented_keys(log: str) -> set[str]:
    """The keys of the table in docs/metrics.md's section on `log` ("## metrics.jsonl: ..."), one `key` a row."""
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as f:
        sections = f.read().split("\n## ")
    section = next(s for s in sections if s.startswith(log))
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))


@pytest.mark.parametrize("log", ["metrics.jsonl", "eval.jsonl"])
def test_every_logged_key_is_documented(full_run, log):
    """docs/metrics.md has a line for every key the short run wrote, and none for a key it no longer writes."""
    logged = {key for row in read_jsonl(full_run / log) for key in row}
    documented = documented_keys(log)
    assert not logged - documented, f"logged in {log} but not in docs/metrics.md: {sorted(logged - documented)}"
    assert not documented - logged, f"in docs/metrics.md but not logged in {log}: {sorted(documented - logged)}"


def test_training_can_be_watched(full_run):
    """curves.png has its grid of panels; each held-out evaluation left a gallery and a few completions;
    --report-to tensorboard wrote the logged numbers as events."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Image.open(full_run / "curves.png") as img:
        assert img.size == (3 * 440, 24 + 5 * 250)  # 13 panels, 3 per row
    for step in (0, 2, 3):
        folder = full_run / f"eval-{step:06d}"
        with Image.open(folder / "gallery.png") as img:
            assert img.size[0] > 400 and img.size[1] > 100
        completions = read_jsonl(folder / "completions.jsonl")
        assert len(completions) == 4 and all("completion" in c and "reward" in c for c in completions)
    events = EventAccumulator(str(full_run / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["reward"]) for r in read_jsonl(full_run / "metrics.jsonl")]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/reward")] == logged
    assert [e.step for e in events.Scalars("eval/avg_group_f1")] == [0, 2, 3]


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, full_run):
    """The full run stopped after 2 of its 3 steps; tests resume copies of it. Started as a user reruns an
    experiment over an old folder, `--config <full run>/run_config.json --name cut --steps 2 --overwrite` into a
    folder that holds another run's files (a stray file, a later checkpoint, log lines, a foreign reference/),
    it also shows what --config and --overwrite do. The planted reference's fingerprint is kept beside it."""
    out = tmp_path_factory.mktemp("cut")
    old = out / "cut"
    (old / "ckpt-000009").mkdir(parents=True)
    (old / "ckpt-000009" / "trainer_state.json").write_text("{}")
    (old / "metrics.jsonl").write_text(json.dumps({"step": 9, "reward": 1.0}) + "\n")
    (old / "stray.txt").write_text("left by the old run")
    (out / "planted.sha256").write_text(plant_foreign_reference(old))
    args = ["--config", str(full_run / "run_config.json"), "--out", str(out), "--name", "cut", "--steps", "2",
            "--overwrite", "--no-progress"]
    assert train.main(args) == 0
    return old


def checkpoint_tensors(run_dir, step) -> dict:
    """The weights and the optimizer state (AdamW's moments and step counts) a checkpoint holds, by name."""
    ckpt = os.path.join(run_dir, f"ckpt-{step:06d}")
    model = load_file(os.path.join(ckpt, "model", "model.safetensors"))
    optimizer = load_file(os.path.join(ckpt, "optimizer", "rank-00000.safetensors"))
    return {**{f"model/{k}": v for k, v in model.items()}, **{f"optimizer/{k}": v for k, v in optimizer.items()}}


def assert_resumed_exactly(run_dir, full_run):
    """The step after the resume logs what the uninterrupted run logged, and leaves the same weights and
    optimizer state: the logged numbers are all computed before the step's update, so a resume that lost
    the optimizer's moments would log them unchanged."""
    resumed = read_jsonl(run_dir / "metrics.jsonl")
    straight = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key, value in straight[2].items():
        if key in TIMING_KEYS or value is None or isinstance(value, bool):
            continue
        assert resumed[2][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    after, expected = checkpoint_tensors(run_dir, 3), checkpoint_tensors(full_run, 3)
    assert after.keys() == expected.keys() and any(k.endswith("/exp_avg_sq") for k in after)
    off = {k: (after[k] - expected[k]).abs().max().item() for k in after}
    assert max(off.values()) <= 1e-7, {k: v for k, v in off.items() if v > 1e-7}


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


def test_resume_with_more_steps_continues_exactly_and_reads_no_pickle(tmp_path, cut_run, full_run, capsys):
    """`--resume RUN --steps 3 --keep-checkpoints 2`: every other setting comes back from the checkpoint, and
    the run now keeps its newest 2 checkpoints."""
    shutil.copytree(cut_run, tmp_path / "cut")
    marker = tmp_path / "pwned"
    plant_pickles(tmp_path / "cut", marker)
    assert train.main(["--resume", str(tmp_path / "cut"), "--steps", "3", "--keep-checkpoints", "2",
                       "--no-progress"]) == 0
    assert not marker.exists()
    assert_resumed_exactly(tmp_path / "cut", full_run)
    out = capsys.readouterr().out
    assert "[resume] --steps: 2 -> 3" in out and "[resume] --keep-checkpoints: 0 -> 2" in out
    assert sorted(p.name for p in (tmp_path / "cut").glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]


@pytest.mark.parametrize("flag, value", [("--lr", "0.5"), ("--data", "elsewhere"), ("--advantage", "grpo")])
def test_resume_refuses_a_changed_experiment_and_leaves_the_run_untouched(tmp_path, cut_run, capsys, flag, value):
    if flag == "--data":  # a folder outside the checkout: a resume that went on must leave nothing here
        value = str(cut_run.parent)
    run = tmp_path / "cut"
    shutil.copytree(cut_run, run)
    before = folder_bytes(run)
    assert train.main(["--resume", str(run), flag, value, "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert f"{flag} {value} (the run has " in err and "--override-resumed" in err
    assert folder_bytes(run) == before


def test_resume_reapplies_the_saved_settings_and_prints_each_change(tmp_path, cut_run, capsys):
    parser = train.build_parser()
    given = vars(parser.parse_args(["--resume", str(cut_run), "--steps", "5", "--eval-every", "3", "--lr", "0.5",
                                    "--override-resumed"]))
    config, resume = train.prepare(parser, given)
    saved = json.loads((cut_run / "run_config.json").read_text())
    changed = {"steps": 5, "eval_every": 3, "lr": 0.5}
    now = dataclasses.asdict(config)
    for key in set(saved) - set(train.INVOCATION_SETTINGS):
        assert now[key] == changed.get(key, saved[key]), key
    printed = capsys.readouterr().out
    for line in ("--steps: 2 -> 5", "--eval-every: 2 -> 3", "--lr: 0.0001 -> 0.5"):
        assert f"[resume] {line}" in printed
    assert resume.step == 2 and resume.later == []


def test_resume_without_a_checkpoint_is_an_error_that_writes_nothing(tiny_data, tmp_path, capsys):
    assert train.main(small_args(tiny_data, tmp_path, "new", 2, ["--resume"])) == 2
    assert "nothing to continue" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert train.main(["--resume", str(tmp_path / "empty")]) == 2
    assert "holds no complete checkpoint" in one_error_line(capsys)
    assert os.listdir(tmp_path / "empty") == []


def test_resume_from_an_earlier_checkpoint_folder(tmp_path, cut_run, capsys):
    """--resume RUN/ckpt-N is refused while later checkpoints exist; with --overwrite the run folder is set back
    to step N (later checkpoints, log lines and evaluations deleted) once the run starts."""
    run = tmp_path / "cut"
    shutil.copytree(cut_run, run)
    before = folder_bytes(run)
    assert train.main(["--resume", str(run / "ckpt-000001")]) == 2
    err = one_error_line(capsys)
    assert "ckpt-000002" in err and "--overwrite" in err
    assert folder_bytes(run) == before
    parser = train.build_parser()
    config, resume = train.prepare(parser, vars(parser.parse_args(["--resume", str(run / "ckpt-000001"),
                                                                   "--overwrite"])))
    assert resume.step == 1 and resume.later == [str(run / "ckpt-000002")]
    train.open_run_folder(str(run), config, dataclasses.asdict(config), resume, SINGLE, print)
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000001"]
    assert latest_checkpoint(str(run)) == str(run / "ckpt-000001")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == [0] and not (run / "eval-000002").exists()


def test_new_run_into_a_used_folder_is_refused_and_leaves_it_untouched(tiny_data, tmp_path, cut_run, capsys):
    shutil.copytree(cut_run, tmp_path / "cut")
    before = folder_bytes(tmp_path / "cut")
    assert train.main(small_args(tiny_data, tmp_path, "cut", 2)) == 2
    err = one_error_line(capsys)
    assert "--resume" in err and "--overwrite" in err
    assert folder_bytes(tmp_path / "cut") == before


def plant_foreign_reference(run_dir) -> str:
    """Replace the run's reference/ with another model of the same shape (the tiny model of seed 1); return its
    fingerprint."""
    from timerpo.policy import save_policy
    from timerpo.tiny import build_tiny_policy

    shutil.rmtree(run_dir / "reference", ignore_errors=True)
    save_policy(build_tiny_policy(seed=1), str(run_dir / "reference"))
    return model_fingerprint(str(run_dir / "reference"))


def test_a_foreign_reference_is_never_used_on_resume(tmp_path, cut_run, capsys):
    run = tmp_path / "cut"
    shutil.copytree(cut_run, run)
    plant_foreign_reference(run)
    before = folder_bytes(run)
    assert train.main(["--resume", str(run), "--steps", "3", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "reference" in err and "fingerprint differs" in err
    assert folder_bytes(run) == before


def test_overwrite_starts_clean(cut_run):
    assert not (cut_run / "stray.txt").exists()
    assert sorted(p.name for p in cut_run.glob("ckpt-*")) == ["ckpt-000001", "ckpt-000002"]
    assert [r["step"] for r in read_jsonl(cut_run / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(cut_run / "eval.jsonl")] == [0, 2]
    made = model_fingerprint(str(cut_run / "reference"))  # the new run's own warm-up result, recorded as such
    record = json.loads((cut_run / "ckpt-000002" / "trainer_state.json").read_text())["extra"]["reference"]
    assert made != (cut_run.parent / "planted.sha256").read_text() and record["sha256"] == made


def test_config_gives_a_runs_settings_and_flags_override_it(full_run, tmp_path, capsys):
    theirs = json.loads((full_run / "run_config.json").read_text())
    config = train.parse_args(["--config", str(full_run / "run_config.json"), "--name", "again", "--lr", "0.5"])
    now = dataclasses.asdict(config)
    for key in set(theirs) - set(train.INVOCATION_SETTINGS) - {"lr"}:
        assert now[key] == theirs[key], key
    assert config.lr == 0.5 and config.name == "again"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**theirs, "learning_rate": 0.1}))
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--config", str(bad)])
    assert exc.value.code == 2 and "'learning_rate' is not a setting" in capsys.readouterr().err


def test_saved_grpo_settings_switched_to_timerpo_get_alpha_back():
    """GRPO forces alpha to 0; settings saved from a GRPO run and switched to TimerPO get the default back."""
    grpo = dataclasses.asdict(train.make_config({"advantage": "grpo"}))
    assert grpo["alpha"] == 0.0
    assert train.make_config({"advantage": "timerpo"}, saved=grpo).alpha == train.Config.alpha
    assert train.make_config({"alpha": 0.7}, saved={**grpo, "advantage": "timerpo"}).alpha == 0.7


def test_a_settings_file_of_wrong_types_is_refused():
    with pytest.raises(train.SettingsError, match="lr = '0.1' is not a valid value"):
        train.saved_settings({"lr": "0.1"}, "f.json")
    with pytest.raises(train.SettingsError, match="advantage = 'ppo' is not a valid value"):
        train.saved_settings({"advantage": "ppo"}, "f.json")
    assert train.saved_settings({"lr": 1, "steps": 3, "device": "cuda"}, "f.json") == {"lr": 1.0, "steps": 3}


def test_a_run_from_config_makes_the_same_steps(cut_run, full_run):
    """The run started from the full run's run_config.json wrote the same settings (but the flags given) and
    made the same steps."""
    mine, theirs = (json.loads((r / "run_config.json").read_text()) for r in (cut_run, full_run))
    for key in set(theirs) - set(train.INVOCATION_SETTINGS) - {"steps"}:
        assert mine[key] == theirs[key], key
    straight = read_jsonl(full_run / "metrics.jsonl")
    for row, ref in zip(read_jsonl(cut_run / "metrics.jsonl"), straight[:2], strict=True):
        for key, value in ref.items():
            if key not in TIMING_KEYS and value is not None and not isinstance(value, bool):
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


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


# Processes killed while writing checkpoint 3 into copies of the cut run, one at each stage of the write. The
# checkpoint written is the uninterrupted run's (its model and optimizer loaded once, in the parent); each
# write runs in a forked child that dies by os._exit, as a kill would: no cleanup, no finally blocks.
KILL_SCRIPT = """
import dataclasses, os, sys
import torch
torch.set_num_threads(1)  # no worker threads in the parent of forked children
sys.path.insert(0, {root!r})
import timerpo.checkpoint as ckpt
import train
from timerpo.policy import load_policy

config = train.parse_args({args!r})
policy = load_policy(os.path.join({source!r}, "model"))
optimizer = train.make_optimizer(policy, config)
ckpt.restore_optimizer({source!r}, ckpt.load_trainer_state({source!r}), policy, optimizer)


def die(*args, **kwargs):
    os._exit(9)


def then_die(write):
    def run(*args, **kwargs):
        write(*args, **kwargs)
        os._exit(9)
    return run


def die_once_renamed_to(name):  # os.replace, dying right after it puts something at a path named `name`
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(dst) == name:
            os._exit(9)
    return replace


real_replace = os.replace
KILLS = {{  # stage reached -> (module, function) replaced by one that dies there
    "model written": (os, "replace", die_once_renamed_to("model")),  # the model folder is in place
    "optimizer written": (ckpt, "save_trainer_state", die),
    "trainer state written": (ckpt, "save_trainer_state", then_die(ckpt.save_trainer_state)),
    "renamed": (os, "replace", die_once_renamed_to("ckpt-000003")),
    "latest updated": (os, "replace", die_once_renamed_to("latest")),
}}
for stage, run_dir in {runs!r}.items():
    pid = os.fork()
    if pid == 0:
        setattr(*KILLS[stage])
        ckpt.save_checkpoint(run_dir, 3, policy, optimizer, extra={{"args": dataclasses.asdict(config)}})
        os._exit(0)
    print(stage, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
KILL_STAGES = ["model written", "optimizer written", "trainer state written", "renamed", "latest updated"]


@pytest.fixture(scope="module")
def killed_runs(tiny_data, cut_run, full_run, tmp_path_factory):
    """{stage: copy of the cut run (2 of 3 steps) whose checkpoint-3 write was killed at that stage}."""
    out = tmp_path_factory.mktemp("killed")
    runs = {stage: str(out / stage.replace(" ", "-") / "cut") for stage in KILL_STAGES}
    for run in runs.values():
        shutil.copytree(cut_run, run)
    script = KILL_SCRIPT.format(root=ROOT, args=small_args(tiny_data, out, "cut", 3),
                                source=str(full_run / "ckpt-000003"), runs=runs)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:-1] == [f"{stage} 9" for stage in KILL_STAGES], proc.stdout
    return {stage: out / stage.replace(" ", "-") / "cut" for stage in KILL_STAGES}


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_kill_at_any_stage_of_a_checkpoint_leaves_latest_on_a_complete_one(killed_runs, cut_run, full_run, stage):
    """`latest` names checkpoint 2 until checkpoint 3 is renamed into place and `latest` rewritten, then 3;
    what it names is complete and intact (the tensors of the run it was copied from), and it is what
    --resume loads (latest_checkpoint)."""
    run = killed_runs[stage]
    step = 3 if stage == "latest updated" else 2
    named = (run / "latest").read_text().strip()
    assert named == f"ckpt-{step:06d}"
    assert latest_checkpoint(str(run)) == str(run / named)
    assert load_trainer_state(str(run / named))["step"] == step
    for name in ("model/config.json", "optimizer/index.json"):
        assert (run / named / name).is_file(), name
    tensors, source = checkpoint_tensors(run, step), checkpoint_tensors(cut_run if step == 2 else full_run, step)
    assert tensors.keys() == source.keys() and all(torch.equal(tensors[k], source[k]) for k in tensors)


@pytest.mark.parametrize("stage", ["trainer state written", "renamed"])
def test_resume_after_a_killed_checkpoint_continues_exactly(tiny_data, killed_runs, full_run, stage):
    """--resume after the kill redoes step 3 from checkpoint 2 and ends where the uninterrupted run did: with
    a complete checkpoint 3 left unrenamed in a temporary folder, and with one renamed into place that
    `latest` does not name yet (overwritten by the redone step's)."""
    run = killed_runs[stage]
    assert train.main(small_args(tiny_data, run.parent, "cut", 3, ["--resume"])) == 0
    assert_resumed_exactly(run, full_run)


def test_bad_flag_is_rejected_clearly(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--tiny-numbers", "digits"], ["--model", "qwen2.5-vl-3b"]])
def test_number_names_need_whole_number_tokens(capsys, flags):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--warmup-position-names", "numbers", *flags])
    assert exc.value.code == 2
    assert "--warmup-position-names numbers" in capsys.readouterr().err
    assert train.parse_args(["--warmup-position-names", "numbers"]).warmup_position_names == "numbers"


def test_saved_checkpoint_loads_and_trains_again(tiny_data, tmp_path, full_run, monkeypatch, capfd):
    """... and --no-progress silences transformers' own loading and saving bars too, on a terminal as well."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as transformers_logging
    model_dir = os.path.join(latest_checkpoint(str(full_run)), "model")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    transformers_logging.enable_progress_bar()  # runs before in this process switched them off
    monkeypatch.setattr(train, "is_terminal", lambda stream: True)
    capfd.readouterr()
    args = small_args(tiny_data, tmp_path, "again", 1, ["--model", model_dir, "--warmup-steps", "0"])
    assert train.main(args) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
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
