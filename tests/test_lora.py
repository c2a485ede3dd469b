"""LoRA (timerpo/lora.py, `train.py --lora-rank R`) on the tiny model: a 2-step run trains only the adapters and
resumes exactly, also on 2 FSDP ranks; with the adapters off the model is the base model to the bit (the KL
reference); the kept OT states and the bf16 sampling copy follow the adapters; eval.py and the merge command
load a LoRA run as a plain model."""
import copy
import dataclasses
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import eval as eval_script
import train
from tests.test_distributed import assert_same_metrics, check, launch, read_metrics, run_args
from tests.test_precision import plot
from timerpo.algorithm import Episode, Prompt, update_policy
from timerpo.lora import ADAPTER_FILE, adapters_disabled, add_adapters, load_adapters, main as lora_main
from timerpo.policy import encode_prompt, load_policy
from timerpo.precision import setup_precision
from timerpo.rollout import collate, completion_forward, completion_seed, sample_completions, shared_prompt_logprobs

RANK = 4


@pytest.fixture(scope="module")
def prompts(tiny_policy):
    return [encode_prompt(tiny_policy, plot(k), "Find the anomalies." + " Please." * k) for k in range(3)]


def with_adapters(tiny_policy):
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model)
    add_adapters(pol, RANK, alpha=2.0 * RANK, base="tiny", seed=0)
    return pol


def train_adapters(pol, prompts):
    """One SGD step on two completions with opposite advantages: the adapters' B leaves zero."""
    prompt = Prompt(index=0, sample=None, encoded=prompts[0], target_text="")
    eps = [Episode(prompt=prompt, group=0, completion_ids=[40 + k, 41, 2], sample_logprobs=[0.0] * 3, text="",
                   finished=True, advantage=a) for k, a in enumerate((1.0, -1.0))]
    params = [p for p in pol.model.parameters() if p.requires_grad]
    stats = update_policy(pol, torch.optim.SGD(params, lr=0.5), eps, micro_batch=2, clip_eps=0.2, beta=0.0,
                          entropy_coef=0.0, max_grad_norm=1e9)
    assert not stats["skipped"]
    pol.model.eval()


@pytest.fixture(scope="module")
def trained(tiny_policy, prompts):
    pol = with_adapters(tiny_policy)
    frozen = {n: p.detach().clone() for n, p in pol.model.named_parameters() if not p.requires_grad}
    train_adapters(pol, prompts)
    assert all(torch.equal(p, frozen[n]) for n, p in pol.model.named_parameters() if not p.requires_grad)
    return pol


def scored(policy, prompts, completions):
    with torch.no_grad():
        return completion_forward(policy, collate(policy, prompts, completions))[0]  # [B, C]


def test_adapters_sit_on_the_language_models_linear_layers_only(trained, tiny_policy):
    trained_names = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert trained_names and all(".language_model.layers." in n and ".lora_" in n for n in trained_names)
    # 3 layers x 7 linear layers x (A, B)
    assert len(trained_names) == 3 * 7 * 2
    assert sum(p.numel() for n, p in trained.model.named_parameters() if p.requires_grad) == 3 * RANK * (
        (128 + 128) * 2 + (128 + 64) * 2 + (128 + 384) * 3)  # q, o; k, v (2 kv heads of 32); gate, up, down
    assert all(p.abs().max() > 0 for n, p in trained.model.named_parameters() if "lora_B" in n)  # off zero


def test_adapters_off_give_the_base_models_logprobs_exactly(trained, tiny_policy, prompts):
    """Parity: after a rank-R update the adapted model differs from the base, and with its adapters off it
    is the base model, in the update forward and in the reference's shared-prefill forward."""
    rows, completions = [prompts[0], prompts[1], prompts[1]], [[40, 41, 2], [50, 2], [7, 8, 9, 10]]
    base = scored(tiny_policy, rows, completions)
    assert (scored(trained, rows, completions) - base).abs().max() > 1e-3
    flags = {n: p.requires_grad for n, p in trained.model.named_parameters()}
    reference = dataclasses.replace(trained, wrapper=None)  # what train.make_reference builds for LoRA
    with adapters_disabled(reference):
        off = scored(reference, rows, completions)
        shared_off = shared_prompt_logprobs(reference, rows, completions)
    # equal up to fp32 rounding: the copies' weights are equal, but BLAS may sum in another order for another
    # memory alignment (measured: 1.2e-7 on the LM head's logits, 4.8e-7 on a log-prob)
    assert (off - base).abs().max() <= 1e-5
    assert (shared_off - shared_prompt_logprobs(tiny_policy, rows, completions)).abs().max() <= 1e-5
    assert {n: p.requires_grad for n, p in trained.model.named_parameters()} == flags  # switched back on
    assert torch.equal(scored(trained, rows, completions), scored(trained, rows, completions))
    assert (scored(trained, rows, completions) - base).abs().max() > 1e-3


def test_kept_states_follow_the_adapters(trained, prompts):
    seeds = [completion_seed(3, 1, i, 2) for i in range(len(prompts))]
    outs = sample_completions(trained, prompts, seeds, max_new_tokens=6, with_states=True)
    with torch.no_grad():
        batch = collate(trained, prompts, [ids for ids, _, _ in outs])
        logprobs, hidden, _ = completion_forward(trained, batch, with_hidden=True)
    for i, (ids, lps, states) in enumerate(outs):
        scale = hidden[i, :len(ids)].abs().max().item()
        assert (hidden[i, :len(ids)] - states).abs().max().item() <= 1e-4 * scale
        assert (logprobs[i, :len(ids)] - torch.tensor(lps)).abs().max().item() <= 1e-4


def test_bf16_sampling_copy_shares_the_frozen_base_and_follows_the_adapters(tiny_policy, prompts):
    pol = with_adapters(tiny_policy)
    setup_precision(pol, torch.bfloat16)
    master, copy_ = dict(pol.model.named_parameters()), dict(pol.rollout_model.named_parameters())
    for name, p in master.items():
        if p.requires_grad:  # the adapters: fp32 masters, bf16 in the copy
            assert p.dtype == torch.float32 and copy_[name].dtype == torch.bfloat16
        else:  # the frozen base: bf16 once, the same storage in both
            assert p.dtype == torch.bfloat16 and copy_[name].data_ptr() == p.data_ptr()
    for model in (pol.model, pol.rollout_model):
        assert all(b.dtype == torch.float32 for b in model.buffers())  # rotary frequencies
    train_adapters(pol, prompts)
    for name, p in master.items():
        if p.requires_grad:
            assert p.abs().max() > 0 or "lora_B" not in name
            assert torch.equal(copy_[name], p.detach().to(torch.bfloat16))  # synced after the step
    # the reference (adapters off) samples with the bf16 base: what a bf16 copy of the base model computes
    base = copy.copy(tiny_policy)
    base.model = copy.deepcopy(tiny_policy.model)
    setup_precision(base, torch.bfloat16, trainable=False)
    rows, completions = [prompts[0], prompts[2]], [[40, 41, 2], [9, 2]]
    with adapters_disabled(pol):
        off = shared_prompt_logprobs(pol, rows, completions)
    on = shared_prompt_logprobs(pol, rows, completions)
    base_logprobs = shared_prompt_logprobs(base, rows, completions)
    # bf16 logits: an other summation order may flip their last bit (2^-8 relative), hence the tolerance;
    # the adapters move these log-probs by about 1 (measured 1.04)
    assert (off - base_logprobs).abs().max() <= 2e-2 < 0.5 < (on - base_logprobs).abs().max()


# ---------------------------------------------------------------------------------------------------
# train.py --lora-rank


def adapters(run, step):
    return load_file(os.path.join(run, f"ckpt-{step:06d}", "adapter", ADAPTER_FILE))


@pytest.fixture(scope="module")
def lora_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    assert train.main(run_args(tiny_data, out, "lora", 2, ["--lora-rank", str(RANK)])) == 0
    return out / "lora"


def test_two_step_lora_run_saves_adapters_and_trains_nothing_else(lora_run, tiny_policy, preset_tiny_policy):
    ckpt = lora_run / "ckpt-000002"
    assert sorted(os.listdir(ckpt / "adapter")) == ["adapter_config.json", ADAPTER_FILE]
    assert not (ckpt / "model").exists()
    one, two = adapters(lora_run, 1), adapters(lora_run, 2)
    assert len(two) == 3 * 7 * 2 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in two)
    assert all(one[k].abs().max() > 0 for k in one if "lora_B" in k)  # B left zero at the first step
    assert max((one[k] - two[k]).abs().max().item() for k in one) > 0
    optimizer = load_file(ckpt / "optimizer" / "rank-00000.safetensors")
    assert {k.rsplit("/", 1)[0] for k in optimizer} == {
        n for n, p in with_adapters(tiny_policy).model.named_parameters() if p.requires_grad}
    # the tiny base is kept in the run (it is built, not loaded), equal to the model the run started from
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(lora_run / "reference").state_dict()
    started = preset_tiny_policy.model.state_dict()
    assert base.keys() == started.keys() and all(torch.equal(base[k], v) for k, v in started.items())
    rows = read_metrics(lora_run)
    assert rows[0]["kl"] == 0.0 < rows[1]["kl"]  # B = 0 at step 1: adapters on and off agree; then they differ


def cut_to_step_one(run, to):
    shutil.copytree(run, to)
    shutil.rmtree(to / "ckpt-000002")
    (to / "latest").write_text("ckpt-000001\n")


def test_lora_run_resumes_exactly(lora_run, tiny_data, tmp_path):
    cut_to_step_one(lora_run, tmp_path / "lora")
    assert train.main(run_args(tiny_data, tmp_path, "lora", 2, ["--lora-rank", str(RANK), "--resume"])) == 0
    again, first = adapters(tmp_path / "lora", 2), adapters(lora_run, 2)
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert [untimed(r) for r in read_metrics(tmp_path / "lora")] == [untimed(r) for r in read_metrics(lora_run)]


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_") and k != "tokens_per_s"}


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "8"], "--lora-rank 8 (the run has 4) would change the experiment"),
    (["--lora-rank", "8", "--override-resumed"], "holds LoRA adapters of rank 4: resume it with --lora-rank 4"),
])
def test_resuming_with_another_rank_is_a_clear_error(lora_run, tiny_data, tmp_path, flags, message, capsys):
    cut_to_step_one(lora_run, tmp_path / "lora")
    assert train.main(run_args(tiny_data, tmp_path, "lora", 2, ["--resume", *flags])) == 2
    assert message in capsys.readouterr().err
    assert read_metrics(tmp_path / "lora") == read_metrics(lora_run)  # nothing was touched
    assert (tmp_path / "lora" / "latest").read_text() == "ckpt-000001\n"


def test_fsdp_ranks_resume_a_lora_run_like_one_process(lora_run, tiny_data, tmp_path):
    """Two FSDP ranks continue the 1-process checkpoint of step 1: the adapters load before sharding, the
    reference runs with them off through FSDP's gathered weights (KL > 0 at step 2), the sharded adapters are
    gathered for the checkpoint."""
    cut_to_step_one(lora_run, tmp_path / "lora")
    check(launch(run_args(tiny_data, tmp_path, "lora", 2, ["--lora-rank", str(RANK), "--resume", "--dist", "fsdp"]),
                 nproc=2))
    rows = read_metrics(tmp_path / "lora")
    assert_same_metrics(rows[1], read_metrics(lora_run)[1])
    sharded, single = adapters(tmp_path / "lora", 2), adapters(lora_run, 2)
    assert max((sharded[k] - single[k]).abs().max().item() for k in single) <= 1e-6


def test_eval_and_merge_load_a_lora_run_as_a_plain_model(lora_run, tmp_path, prompts):
    folder = eval_script.resolve_model(str(lora_run))
    assert folder.endswith(os.path.join("ckpt-000002", "adapter"))
    merged = load_policy(folder)  # what eval.py --model RUN loads
    adapted = load_policy(str(lora_run / "reference"))
    load_adapters(adapted, folder)
    assert merged.adapters is None and not any(".lora_" in n or "base_layer" in n for n, _ in
                                               merged.model.named_parameters())
    rows, completions = [prompts[0], prompts[1]], [[40, 41, 2], [50, 2]]
    assert (scored(merged, rows, completions) - scored(adapted, rows, completions)).abs().max() <= 1e-5
    with adapters_disabled(adapted):
        assert (scored(merged, rows, completions) - scored(adapted, rows, completions)).abs().max() > 1e-6
    assert lora_main(["merge", str(lora_run), str(tmp_path / "merged")]) == 0
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    assert saved.keys() == merged.model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in merged.model.state_dict().items())
    assert lora_main(["merge", str(tmp_path), str(tmp_path / "nothing")]) == 2  # not a LoRA run: one line


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "4", "--offload"], "LoRA's trained state is already small"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,qkv"], "LoRA targets must be some of"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
])
def test_bad_lora_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_paper_preset_is_full_fine_tuning():
    config = train.parse_args(["--model", "qwen2.5-vl-3b", "--device", "cpu"])
    assert (config.lora_rank, config.offload, config.pure_bf16) == (0, False, False)
