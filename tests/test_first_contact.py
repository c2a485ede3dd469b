"""A new user's first commands: --model is found (or refused with one useful sentence) before anything is
generated or written, near misses name the model they resemble, and a failed start leaves no run folder."""
import importlib.metadata
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest

import eval as eval_script
import train
from timerpo.policy import ModelNotFound, closest_known_model, find_model, load_policy, save_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_3B = "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache (the lookup reads the constant at call time)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def fake_cached_snapshot(cache, hub_id: str, policy) -> str:
    """`policy` saved where `hf download hub_id` would have put it: models--org--name/snapshots/<sha>/."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    sha = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    save_policy(policy, str(snapshot))
    return str(snapshot)


def test_the_download_command_we_print_is_the_one_huggingface_hub_installs():
    """huggingface_hub 1.x/2.x ship `hf` (its `huggingface-cli` is gone); the message must name a command that
    exists for the installed stack."""
    scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points
               if e.group == "console_scripts"}
    assert "hf" in scripts and "huggingface-cli" not in scripts
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert f"hf download {QWEN_3B}" in readme and "huggingface-cli" not in readme


@pytest.mark.parametrize("typed, meant", [
    ("qwen2.5vl-3b", "qwen2.5-vl-3b"),  # a missing dash
    ("Qwen2.5-VL-3B", "qwen2.5-vl-3b"),  # case
    ("qwen2.5-vl-3", "qwen2.5-vl-3b"),  # the size letter dropped
    ("qwen2.5_vl_7b", "qwen2.5-vl-7b"),
    ("qwen25-vl-7B", "qwen2.5-vl-7b"),
    ("qwen-vl-7b", "qwen2.5-vl-7b"),
    ("Qwen/Qwen2.5-VL-3B", "qwen2.5-vl-3b"),  # a hub id without -Instruct
    ("tiyn", "tiny"),
])
def test_a_near_miss_names_the_known_model(typed, meant, empty_hub_cache):
    assert closest_known_model(typed) == meant
    with pytest.raises(ModelNotFound, match=f"did you mean {meant}\\?"):
        find_model(typed)


@pytest.mark.parametrize("typed", ["llama-3-8b", "gpt2", "some-org/some-model"])
def test_an_unrelated_name_gets_no_guess(typed, empty_hub_cache):
    assert closest_known_model(typed) is None
    with pytest.raises(ModelNotFound) as err:
        find_model(typed)
    assert "did you mean" not in str(err.value) and f"hf download {typed}" in str(err.value)


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", QWEN_3B])
def test_known_weights_not_here_say_how_to_fetch_them(name, empty_hub_cache):
    with pytest.raises(ModelNotFound, match=f"`hf download {QWEN_3B}`"):
        find_model(name)


def test_short_name_and_hub_id_load_from_the_local_cache(tiny_policy, empty_hub_cache):
    snapshot = fake_cached_snapshot(empty_hub_cache, QWEN_3B, tiny_policy)
    assert find_model("qwen2.5-vl-3b") == snapshot and find_model(QWEN_3B) == snapshot
    policy = load_policy("qwen2.5-vl-3b")
    assert policy.model.config.text_config.hidden_size == tiny_policy.model.config.text_config.hidden_size


def test_a_folder_needs_config_and_safetensors(tiny_policy, tmp_path):
    with pytest.raises(ModelNotFound, match="No model folder at"):
        find_model(str(tmp_path / "absent"))
    save_policy(tiny_policy, str(tmp_path / "model"))
    assert find_model(str(tmp_path / "model")) == str(tmp_path / "model")
    os.remove(tmp_path / "model" / "model.safetensors")
    with pytest.raises(ModelNotFound, match="no file named model.safetensors"):
        find_model(str(tmp_path / "model"))


def start_args(tmp_path, model: str) -> list[str]:
    """A train.py start whose data folder does not exist yet: were it reached, it would be generated."""
    return ["--model", model, "--data", str(tmp_path / "train-data"), "--eval-data", str(tmp_path / "test-data"),
            "--out", str(tmp_path / "runs"), "--name", "first", "--no-progress"]


def assert_nothing_made(tmp_path):
    for made in ("train-data", "test-data", os.path.join("runs", "first")):
        assert not (tmp_path / made).exists(), made


def test_train_refuses_a_misspelt_model_before_generating_data(tmp_path, empty_hub_cache, capsys):
    assert train.main(start_args(tmp_path, "qwen2.5vl-3b")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown model 'qwen2.5vl-3b': did you mean qwen2.5-vl-3b?") and "\n" not in err
    assert_nothing_made(tmp_path)


def test_train_without_the_weights_is_one_sentence_and_makes_nothing(tmp_path):
    """As a new user meets it: a fresh process, an empty cache, data not generated yet."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *start_args(tmp_path, "qwen2.5-vl-3b")],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"`hf download {QWEN_3B}`" in proc.stderr
    assert_nothing_made(tmp_path)


@pytest.mark.parametrize("source", ["--data", "--series"])
def test_eval_refuses_a_misspelt_model_before_reading_data(source, tmp_path, empty_hub_cache, capsys):
    """The data path does not exist either: the model is checked first, so its error is the one printed."""
    out = tmp_path / "out"
    assert eval_script.main(["--model", "Qwen2.5-VL-7B", source, str(tmp_path / "absent"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and "did you mean qwen2.5-vl-7b?" in err
    assert not out.exists()


def tiny_run_args(data, out, name, steps) -> list[str]:
    """The smallest train.py run: no warm-up, 2 prompts x 2 completions of <= 4 tokens."""
    return ["--data", data, "--eval-data", data, "--out", str(out), "--name", name, "--steps", str(steps),
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--warmup-steps", "0",
            "--warmup-vision-steps", "0", "--eval-samples", "2", "--eval-every", "5", "--save-every", "5",
            "--micro-batch", "4", "--rollout-batch", "4", "--no-progress"]


def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(tiny_data, tmp_path, monkeypatch):
    def broken_eval(*args, **kwargs):  # the start-of-RL evaluation: after the folder is made, before step 1
        raise RuntimeError("injected")

    monkeypatch.setattr(train, "run_eval", broken_eval)
    args = tiny_run_args(tiny_data, tmp_path / "runs", "early", 1)
    with pytest.raises(RuntimeError, match="injected"):
        train.main(args)
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / "early").exists()
    # a folder that was there before is never removed: a new run into it is refused before anything starts
    (tmp_path / "runs" / "early").mkdir()
    (tmp_path / "runs" / "early" / "notes.txt").write_text("mine")
    assert train.main(args) == 2
    assert (tmp_path / "runs" / "early" / "notes.txt").read_text() == "mine"


def test_a_run_that_fails_after_its_first_step_keeps_its_folder(tiny_data, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):  # the checkpoint after step 1 (--steps 1 saves at the end)
        raise RuntimeError("injected")

    monkeypatch.setattr(train, "save_checkpoint", broken_save)
    with pytest.raises(RuntimeError, match="injected"):
        train.main(tiny_run_args(tiny_data, tmp_path / "runs", "late", 1))
    assert (tmp_path / "runs" / "late" / "metrics.jsonl").exists()
