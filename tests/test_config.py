"""train.Config's defaults say where they come from: the paper's settings (method.md §18) one row per setting,
the public release's where the paper's text leaves one open, this implementation's for the rest; the presets
change exactly the values listed here; --adv-norm sets both normalisations unless --tsr-norm is given."""
import dataclasses

import pytest
import torch

import train

# The paper's table (method.md §7 and §18): Config field -> the paper's value. Exactly these fields are paper().
PAPER = {
    "advantage": "timerpo",  # A = Â_main + α·Â⊥_TsR
    "cot": "expcot",  # the OT target is the expert chain of thought
    "grounding": "ot",  # entropic OT cost W, s = exp(−W/τ)
    "adv_norm": "std",  # "group-normalized": (R − mean) / (std + δ)
    "tsr_norm": "std",  # Â_TsR normalized as Â_main
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
# Settings the paper's text leaves open, with the public release's value: exactly these fields are release().
RELEASE_DEFAULTS = {"loc_reward": "six-mean"}  # the mean of six scores (the text may mean affiliation F1 alone)
# Settings the paper does not have (the tiny model's warm-up, the floor of --tsr-norm std-floor): project().
PROJECT = {"tsr_floor", "warmup_steps", "warmup_vision_steps", "warmup_aux_weight", "warmup_lr", "warmup_targets",
           "warmup_pointer", "warmup_position", "warmup_copy", "warmup_reasoning", "warmup_position_names",
           "tiny_numbers"}
# Batching, evaluation and checkpoint cadence are settings of the run, not values of the paper.
NOT_THE_PAPERS = {"micro_batch", "rollout_batch", "eval_every", "eval_samples", "save_every"}
# The tiny CPU preset: every value it changes, and nothing else.
TINY = dict(steps=100, prompts_per_step=4, max_new_tokens=72, lr=1e-4, warmup_steps=400, warmup_vision_steps=200,
            warmup_aux_weight=1.0, warmup_lr=2e-3, warmup_targets="columns", warmup_pointer=1.0, warmup_position=1.0,
            tiny_numbers="whole", eval_every=50, eval_samples=128,
            save_every=50, micro_batch=20, rollout_batch=20)
# The release preset: the public release's choices where a flag exists (method.md §23).
RELEASE = dict(adv_norm="mean", tsr_norm="mean", loc_reward="six-mean", eval_temperature=0.4)

FIELDS = {f.name: f for f in dataclasses.fields(train.Config)}


def tagged(source):
    return {name for name, f in FIELDS.items() if f.metadata["source"] == source}


@pytest.mark.parametrize("name, value", PAPER.items(), ids=list(PAPER))
def test_paper_setting_is_the_default(name, value):
    assert FIELDS[name].metadata["source"] == "paper", f"{name} is a paper setting"
    assert FIELDS[name].default == value
    assert getattr(train.make_config({"model": "qwen2.5-vl-3b"}), name) == value  # the Qwen models' preset


def test_the_paper_tag_marks_only_the_papers_values():
    assert tagged("paper") == set(PAPER)
    assert tagged("release") == set(RELEASE_DEFAULTS)
    assert {name: FIELDS[name].default for name in RELEASE_DEFAULTS} == RELEASE_DEFAULTS
    assert tagged("project") == PROJECT
    assert NOT_THE_PAPERS <= tagged("run")
    assert {f.metadata["source"] for f in FIELDS.values()} <= set(train.SOURCES)


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


def test_release_preset_sets_exactly_the_releases_choices():
    assert train.RELEASE == RELEASE
    release = dataclasses.asdict(train.make_config({"model": "qwen2.5-vl-3b", "preset": "release"}))
    paper = dataclasses.asdict(train.make_config({"model": "qwen2.5-vl-3b"}))
    assert {k: v for k, v in release.items() if v != paper[k] and k != "preset"} == dict(adv_norm="mean",
                                                                                       tsr_norm="mean")
    assert {k: release[k] for k in RELEASE} == RELEASE
    assert train.parse_args(["--preset", "release"]).adv_norm == "mean"  # from the command line, on the tiny model
    assert train.parse_args(["--preset", "release"]).steps == PAPER["steps"]  # the release's sizes are the paper's
    long = train.parse_args(["--preset", "tiny-long"])
    assert {k: getattr(long, k) for k in TINY} == dict(TINY, warmup_steps=2400)  # tiny, with a longer warm-up


def test_help_names_the_values_of_each_preset():
    """--help says which flags --preset release sets, and every flag's line shows each preset's value."""
    preset_help = train.flag_help(FIELDS["preset"])
    for key, value in RELEASE.items():
        assert f"--{key.replace('_', '-')} {value}" in preset_help
    assert train.flag_help(FIELDS["adv_norm"]).endswith("[paper: std; release: mean]")
    assert train.flag_help(FIELDS["steps"]).endswith("[paper: 250; tiny: 100]")
    assert train.flag_help(FIELDS["warmup_steps"]).endswith("[default: 0; tiny: 400; tiny-long: 2400]")
    assert train.flag_help(FIELDS["loc_reward"]).endswith("[release: six-mean]")
    assert train.flag_help(FIELDS["micro_batch"]).endswith("[default: 4; tiny: 20]")
    assert "--preset {paper,tiny,tiny-long,release}" in train.build_parser().format_help()


@pytest.mark.parametrize("argv, adv_norm, tsr_norm", [
    ([], "std", "std"),
    (["--adv-norm", "mean"], "mean", "mean"),  # one flag gives the release's normalisation of both
    (["--adv-norm", "mean", "--tsr-norm", "std"], "mean", "std"),
    (["--tsr-norm", "std-floor", "--adv-norm", "mean"], "mean", "std-floor"),
    (["--tsr-norm", "mean"], "std", "mean"),
    (["--preset", "release"], "mean", "mean"),
    (["--preset", "release", "--adv-norm", "std"], "std", "std"),
    (["--preset", "release", "--tsr-norm", "std"], "mean", "std"),
])
def test_adv_norm_sets_both_normalisations_unless_tsr_norm_is_given(argv, adv_norm, tsr_norm):
    config = train.parse_args(["--model", "qwen2.5-vl-3b", *argv])
    assert (config.adv_norm, config.tsr_norm) == (adv_norm, tsr_norm)


def test_adv_norm_over_saved_settings():
    """A saved run's pair is kept as saved; a flag given over it sets both, as on a new run."""
    saved = {"adv_norm": "mean", "tsr_norm": "std-floor"}
    assert (train.make_config({}, saved).adv_norm, train.make_config({}, saved).tsr_norm) == ("mean", "std-floor")
    assert train.make_config({"adv_norm": "std"}, saved).tsr_norm == "std"
    assert train.make_config({"adv_norm": "std", "tsr_norm": "mean"}, saved).tsr_norm == "mean"
    assert train.make_config({}, {"adv_norm": "mean"}).tsr_norm == "mean"  # a hand-written file's single switch


def test_grpo_is_timerpo_with_alpha_zero():
    assert train.make_config({"advantage": "grpo"}).alpha == 0.0
    assert train.make_config({"advantage": "no-projection"}).alpha == PAPER["alpha"]
