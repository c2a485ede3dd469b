"""train.py under torchrun on CPU (gloo): 2 ranks make the same update as 1 process on the same global batch,
DDP and FSDP agree, a 2-rank checkpoint resumes on 1 process and a 1-process one on 2 ranks (without
reading the pickles planted beside it), an older pickled checkpoint is refused, a failing rank ends the
job quickly.

The oracle is the 1-process run itself (tested on its own in test_train.py / test_algorithm.py). One AdamW
step moves each weight by about lr whatever the gradient's scale, so the weight comparison checks that
every rank applied the same, fully synchronised update; the logged loss and pre-clip gradient norm check
the scale (a loss divided by the local instead of the global token count, or gradients averaged instead
of summed, changes them by a factor of 2).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import train
from tests.planted import make_malicious_older_format, plant_pickles
from timerpo.checkpoint import load_optimizer, quiet_single_process, restore_optimizer, save_optimizer
from timerpo.distributed import Dist, DistError, rank_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 2e-5  # the tiny preset's; the weights move by ~LR in one step
COMPARED = ("reward", "loss", "grad_norm", "entropy", "kl", "adv_tsr_perp_absmean", "adv_std", "adv_main_absmean",
            "grounding_mean", "completion_len", "zero_std_frac")


def run_args(data, out, name, steps, extra=()):
    """Tiny flags: 4 prompts x 3 completions of <= 10 tokens; beta > 0 keeps the reference model in play."""
    return ["--data", data, "--eval-data", data, "--out", str(out), "--name", name, "--steps", str(steps),
            "--prompts-per-step", "4", "--group-size", "3", "--max-new-tokens", "10", "--warmup-steps", "0", "--warmup-vision-steps", "0",
            "--eval-samples", "2", "--eval-every", "100", "--save-every", "1", "--micro-batch", "4",
            "--rollout-batch", "6", "--expcot-max-tokens", "48", "--lr", str(LR), "--beta", "0.001",
            "--no-progress", *extra]


def launch(args, nproc=None, env_extra=None, timeout=300):
    """train.py in fresh processes: plain python (nproc None) or torchrun with nproc ranks. One thread per
    process, so two ranks use the two cores without oversubscribing them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    head = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(head + ["train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(run_dir, step):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(run_dir, f"ckpt-{step:06d}", "model"))
    return model.state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_metrics(row, ref):
    assert row["step"] == ref["step"]
    for key in COMPARED:
        assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One process x 4 prompts (2 steps), and 2 ranks x 2 prompts (1 step) with DDP and with FSDP."""
    out = tmp_path_factory.mktemp("dist")
    check(launch(run_args(tiny_data, out, "single", 2)))
    for mode in ("ddp", "fsdp"):
        check(launch(run_args(tiny_data, out, mode, 1, ["--dist", mode]), nproc=2))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_make_the_one_process_update(runs, mode, preset_tiny_policy):
    single, dist = weights(runs / "single", 1), weights(runs / mode, 1)
    start = {k: v for k, v in preset_tiny_policy.model.state_dict().items()}
    assert max_diff(single, start) > 0.5 * LR  # the step moved the weights
    assert max_diff(dist, single) <= 1e-5
    assert_same_metrics(read_metrics(runs / mode)[0], read_metrics(runs / "single")[0])


def test_ddp_and_fsdp_agree(runs):
    assert max_diff(weights(runs / "ddp", 1), weights(runs / "fsdp", 1)) <= 1e-6
    assert_same_metrics(read_metrics(runs / "ddp")[0], read_metrics(runs / "fsdp")[0])


def test_two_rank_checkpoint_resumes_on_one_process(runs, tiny_data):
    optimizer = runs / "fsdp" / "ckpt-000001" / "optimizer"
    assert sorted(os.listdir(optimizer)) == ["index.json", "rank-00000.safetensors", "rank-00001.safetensors"]
    shutil.copytree(runs / "fsdp", runs / "resumed")
    check(launch(run_args(tiny_data, runs, "resumed", 2, ["--resume"])))
    rows = read_metrics(runs / "resumed")
    assert [r["step"] for r in rows] == [1, 2]
    assert_same_metrics(rows[1], read_metrics(runs / "single")[1])
    assert max_diff(weights(runs / "resumed", 2), weights(runs / "single", 2)) <= 1e-5


def test_planted_pickles_are_never_read_under_torchrun(runs, tiny_data):
    """The 1-process checkpoint after step 1, with payloads planted beside its safe files, resumes on 2 FSDP
    ranks (another number of ranks) and makes the 1-process step 2; the payloads never run."""
    run = runs / "planted"
    shutil.copytree(runs / "single", run)
    shutil.rmtree(run / "ckpt-000002")
    (run / "latest").write_text("ckpt-000001\n")
    marker = runs / "pwned-planted"
    plant_pickles(run, marker)
    check(launch(run_args(tiny_data, runs, "planted", 2, ["--resume", "--dist", "fsdp"]), nproc=2))
    assert not marker.exists()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert_same_metrics(rows[1], read_metrics(runs / "single")[1])
    assert max_diff(weights(run, 2), weights(runs / "single", 2)) <= 1e-5


def test_older_checkpoint_is_refused_under_torchrun(runs, tiny_data):
    run = runs / "older"
    shutil.copytree(runs / "fsdp", run)
    marker = runs / "pwned-older"
    make_malicious_older_format(run, marker)
    proc = launch(run_args(tiny_data, runs, "older", 2, ["--resume", "--dist", "fsdp"]), nproc=2)
    assert proc.returncode != 0
    assert "pickles that can run any code when loaded, so it is refused" in proc.stderr
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(run)] == [1]


def test_a_failing_rank_ends_the_job_quickly(tiny_data, tmp_path):
    start = time.monotonic()
    proc = launch(run_args(tiny_data, tmp_path, "fail", 2, ["--dist", "fsdp"]), nproc=2,
                  env_extra={"TIMERPO_FAIL_RANK": "1"}, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert "rank 1 failed: RuntimeError: failure injected by TIMERPO_FAIL_RANK=1" in proc.stderr


def test_offload_in_one_process_makes_the_plain_run_exactly(runs, tiny_data):
    """`python train.py --offload` (no torchrun): a one-rank FSDP2 group with CPUOffloadPolicy and gradient
    checkpointing. On a CPU device the offload's copies are CPU to CPU, but its code path runs (see
    test_offload_policy_is_applied) and the run is the plain 1-process run to the bit: weights, AdamW state
    and every logged number, at both steps."""
    proc = launch(run_args(tiny_data, runs, "offload", 2, ["--offload"]))
    check(proc)
    assert "[offload] FSDP2 over 1 rank(s)" in proc.stdout
    for step in (1, 2):
        offloaded, plain = weights(runs / "offload", step), weights(runs / "single", step)
        assert all(torch.equal(offloaded[k], plain[k]) for k in plain)
    for row, ref in zip(read_metrics(runs / "offload"), read_metrics(runs / "single"), strict=True):
        assert {k: row[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}
    state = [load_file(runs / r / "ckpt-000002" / "optimizer" / "rank-00000.safetensors") for r in ("offload", "single")]
    assert state[0].keys() == state[1].keys() and all(torch.equal(state[0][k], state[1][k]) for k in state[1])


def test_offload_policy_is_applied(tiny_policy, monkeypatch):
    """init_distributed makes a one-rank group without torchrun for --offload, and prepare_policy shards every
    unit with CPU offload (host-memory shards, no pinning on a CPU device); forwards run on the run's device."""
    import copy

    import torch.distributed as torch_dist

    from timerpo.distributed import fsdp_modules, init_distributed, prepare_policy

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistError, match="cannot run with --dist ddp"):
        init_distributed("ddp", "cpu", offload=True)
    d = init_distributed("fsdp", "cpu", offload=True)
    try:
        assert (d.mode, d.world_size, d.offload, torch_dist.get_world_size()) == ("fsdp", 1, True, 1)
        pol = copy.copy(tiny_policy)
        pol.model = copy.deepcopy(tiny_policy.model)
        prepare_policy(pol, d, grad_checkpointing=True)
        units = fsdp_modules(pol.model)
        assert len(units) == 3 + 2 + 1  # decoder layers, vision blocks, root
        params = [fp for unit in units for fp in unit._get_fsdp_state()._fsdp_param_group.fsdp_params]
        assert len(params) == len(list(pol.model.parameters()))
        assert all(fp.offload_to_cpu and not fp.pin_memory for fp in params)
        assert pol.device == torch.device("cpu") == pol.compute_device
    finally:
        d.close()


# -- pieces, in one process ------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 10))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slice_is_contiguous_and_complete(n, world):
    items = list(range(n))
    shares = [rank_slice(items, Dist(rank=r, world_size=world), even=False) for r in range(world)]
    assert [x for s in shares for x in s] == items  # rank order = 1-process order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if n % world:
        with pytest.raises(DistError, match=f"must be divisible by the number of ranks \\({world}\\)"):
            rank_slice(items, Dist(rank=0, world_size=world))
    else:
        assert shares == [rank_slice(items, Dist(rank=r, world_size=world)) for r in range(world)]


def test_global_batch_must_split_into_whole_groups(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--prompts-per-step", "4"])
    assert exc.value.code == 2
    assert "--prompts-per-step (4)" in capsys.readouterr().err


def test_dist_without_torchrun_is_a_clear_error(monkeypatch, capsys, tmp_path):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert train.main(["--dist", "fsdp", "--out", str(tmp_path)]) == 2
    assert "needs the torchrun launcher" in capsys.readouterr().err


def stepped_optimizer(policy):
    """A copy of the tiny model and an AdamW that has taken one step on fixed pseudo-random gradients."""
    import copy

    pol = copy.copy(policy)
    pol.model = copy.deepcopy(policy.model)
    opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for p in pol.model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return pol, opt


def assert_same_optimizer_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for i in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(sa["state"][i][key]), torch.as_tensor(sb["state"][i][key]))
    def plain(groups):  # DCP hands tuples (betas) back as lists
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]
    assert plain(sa["param_groups"]) == plain(sb["param_groups"])


def test_optimizer_round_trips_through_safetensors(tiny_policy, tmp_path):
    pol, opt = stepped_optimizer(tiny_policy)
    save_optimizer(pol, opt, str(tmp_path / "optimizer"), Dist())
    assert sorted(os.listdir(tmp_path / "optimizer")) == ["index.json", "rank-00000.safetensors"]
    fresh = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)
    load_optimizer(pol, fresh, str(tmp_path / "optimizer"), Dist())
    assert_same_optimizer_state(opt, fresh)


def test_trusted_older_optimizer_formats_still_load(tiny_policy, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    pol, opt = stepped_optimizer(tiny_policy)
    with quiet_single_process():
        dcp.save(get_optimizer_state_dict(pol.model, opt), checkpoint_id=str(tmp_path / "optimizer"), no_dist=True)
    from_dcp = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)
    restore_optimizer(str(tmp_path), {"pickled": True}, pol, from_dcp)
    assert_same_optimizer_state(opt, from_dcp)
    legacy = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)  # a checkpoint from before DCP
    restore_optimizer(str(tmp_path), {"pickled": True, "optimizer": opt.state_dict()}, pol, legacy)
    assert_same_optimizer_state(opt, legacy)


def test_gpu_smoke_script_runs_its_code_path_on_cpu(tiny_data):
    """bench/gpu_smoke.py (FSDP2 over one rank, tiny config): the CUDA run cannot happen in CI, its path can."""
    args = ["--config", "tiny", "--device", "cpu", "--data", tiny_data, "--steps", "1", "--prompts", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--micro-batch", "2", "--rollout-batch", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "bench/gpu_smoke.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fsdp over 1 rank(s)" in proc.stdout
    step = [line for line in proc.stdout.splitlines() if line.startswith("[step 1]")]
    assert step and "tokens/s" in step[0] and "MFU n/a" in step[0]


def load_bench(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_table_configs_have_the_released_sizes():
    """method.md §17: the real 3B has 3.755 B parameters, vision 669 M; the 7B is the '8.29 B' model."""
    mt = load_bench("memory_table")
    c3, c7 = (mt.parameter_counts(mt.qwen25vl_config(s)) for s in ("3b", "7b"))
    assert round(c3["total"] / 1e6) == 3755 and round(c3["vision"] / 1e6) == 669
    assert round(c7["total"] / 1e7) == 829
    # one 3B decoder layer by hand: q, k, v (with bias), o; gate, up, down; two RMSNorm weights
    h, kv, inter = 2048, 2 * 128, 11008
    assert c3["layer"] == h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h


def test_saved_bytes_counts_what_autograd_keeps():
    mt = load_bench("memory_table")
    x = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000))
    assert mt.saved_bytes(lambda: torch.exp(x).sum(), []) == 4000  # exp keeps its output
    assert mt.saved_bytes(lambda: (x * w).sum(), [w]) == 4000  # mul keeps x (for w's grad); w is a parameter
