"""train.Config's defaults are the paper's settings (method.md §18), one row per setting, and the tiny preset
changes exactly the values listed here."""
import dataclasses

import pytest
import torch

import train

# The paper's table (method.md §7 and §18): Config field -> the paper's value.
PAPER = {
    "advantage": "timerpo",  # A = Â_main + α·Â⊥_TsR
    "cot": "expcot",  # the OT target is the expert chain of thought
    "grounding": "ot",  # entropic OT cost W, s = exp(−W/τ)
    "adv_norm": "std",  # "group-normalized": (R − mean) / (std + δ)
    "tsr_norm": "std",  # Â_TsR normalized as Â_main
    "loc_reward": "six-mean",  # the public release's localization reward
    "steps": 250,  # 10 epochs of 3,200 prompts
    "prompts_per_step": 128,
    "group_size": 5,
    "max_new_tokens": 1024,
    "lr": 1e-6,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "alpha": 0.3,
    "beta": 0.001,
    "entropy_coef": 0.001,
    "clip_eps": 0.2,
    "tau": 0.5,
    "ot_eps": 0.08,
    "ot_iters": 50,
    "expcot_max_tokens": 512,
    "eval_temperature": 0.4,  # validation sampling
}
# Fields tagged paper() whose default is a setting of this implementation, not a row of the paper's table.
NOT_IN_THE_TABLE = {"tsr_floor", "micro_batch", "rollout_batch", "warmup_steps", "warmup_vision_steps",
                    "warmup_aux_weight", "warmup_lr", "warmup_targets", "warmup_pointer", "eval_every",
                    "eval_samples", "save_every"}
# The tiny CPU preset: every value it changes, and nothing else.
TINY = dict(steps=100, prompts_per_step=4, max_new_tokens=72, lr=1e-4, warmup_steps=400, warmup_vision_steps=200,
            warmup_aux_weight=1.0, warmup_lr=2e-3, warmup_targets="columns", eval_every=50, eval_samples=128,
            save_every=50, micro_batch=20, rollout_batch=20)

FIELDS = {f.name: f for f in dataclasses.fields(train.Config)}


@pytest.mark.parametrize("name, value", PAPER.items(), ids=list(PAPER))
def test_paper_setting_is_the_default(name, value):
    assert FIELDS[name].metadata["paper"], f"{name} is a paper setting"
    assert FIELDS[name].default == value
    assert getattr(train.make_config({"model": "qwen2.5-vl-3b"}), name) == value  # the Qwen models' preset


def test_every_paper_field_is_a_row_of_the_table_or_listed_apart():
    tagged = {name for name, f in FIELDS.items() if f.metadata["paper"]}
    assert tagged - NOT_IN_THE_TABLE == set(PAPER)


def test_optimizer_is_the_papers_adamw(tiny_policy):
    """AdamW, betas (0.9, 0.999), with Config's lr and weight decay, and no schedule."""
    config = train.make_config({"model": "qwen2.5-vl-3b"})
    optimizer = train.make_optimizer(tiny_policy, config)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-6, (0.9, 0.999), 0.01)


def test_tiny_preset_changes_exactly_its_listed_values():
    assert train.TINY == TINY
    tiny = dataclasses.asdict(train.make_config({"model": "tiny"}))
    paper = dataclasses.asdict(train.make_config({"model": "tiny", "preset": "paper"}))
    assert {k: v for k, v in tiny.items() if v != paper[k] and k != "preset"} == TINY


def test_grpo_is_timerpo_with_alpha_zero():
    assert train.make_config({"advantage": "grpo"}).alpha == 0.0
    assert train.make_config({"advantage": "no-projection"}).alpha == PAPER["alpha"]
