"""TimerPO wired into training: what train.rl_step hands to the update, what the OT is computed against, and
which weights the KL reference holds. The formulas are tested on their own (test_advantage.py, test_ot.py,
test_objective.py); these tests check that the loop feeds them the right inputs and uses their outputs.

rl_step runs for real on the tiny model (2 prompts x 3 completions of <= 8 tokens). Only the outcome rewards
are replaced, after the real scoring, by fixed values that differ within each group: a random model earns 0
everywhere, which would leave Â_main = 0 and the projection nothing to remove.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import data_gen
import ot
import timerpo.algorithm
import train
from tests.test_advantage import np_centre, np_final, np_project
from timerpo.algorithm import make_prompt
from timerpo.prompt import generic_cot
from timerpo.rollout import collate, completion_forward

G = 3
REWARDS = [1.0, 0.2, 0.5, 0.0, 0.7, 0.3]  # per completion, two groups of G = 3
PICKS = [0, 9]  # data rows: two families


def step_config(**given) -> train.Config:
    """The tiny preset at test size, as make_config builds it from flags (`advantage="grpo"` sets α = 0)."""
    small = dict(model="tiny", prompts_per_step=len(PICKS), group_size=G, max_new_tokens=8, micro_batch=4,
                 rollout_batch=6, expcot_max_tokens=48, beta=0.0, device="cpu", seed=0)
    return train.resolve_defaults(train.make_config({**small, **given}))


def fresh(policy):
    pol = copy.copy(policy)
    pol.model = copy.deepcopy(policy.model)
    return pol


@dataclasses.dataclass
class StepRecord:
    prompts: list
    episodes: list
    targets: tuple  # what ground_completions was given: ([P, T, D], [P, T]), or None
    update_advantages: torch.Tensor  # what the objective was given, per completion


def run_step(tiny_policy, tiny_data, **given) -> StepRecord:
    """One train.rl_step on a fresh copy of the tiny model; records what the OT and the objective received."""
    config = step_config(**given)
    samples = data_gen.load_samples(tiny_data)
    policy = fresh(tiny_policy)
    prompts = [make_prompt(policy, tiny_data, samples, i, config.cot) for i in PICKS]
    seen = {"targets": None, "adv": []}

    def score(episodes, *, loc_mode):
        real_score(episodes, loc_mode=loc_mode)
        for ep, r in zip(episodes, REWARDS):
            ep.reward = dataclasses.replace(ep.reward, total=r)

    def ground(episodes, targets, **kw):
        seen["targets"] = targets
        return real_ground(episodes, targets, **kw)

    def objective(logprobs, old, ref, entropy, advantages, *args, **kw):
        seen["adv"].append(advantages.detach().clone())
        return real_objective(logprobs, old, ref, entropy, advantages, *args, **kw)

    real_score, real_ground, real_objective = train.score_outcomes, train.ground_completions, \
        timerpo.algorithm.timerpo_objective
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "score_outcomes", score)
        mp.setattr(train, "ground_completions", ground)
        mp.setattr(timerpo.algorithm, "timerpo_objective", objective)
        episodes, _, update, _ = train.rl_step(policy, None, train.make_optimizer(policy, config), prompts, 0,
                                               config)
    assert not update["skipped"]
    return StepRecord(prompts, episodes, seen["targets"], torch.cat(seen["adv"]).double())


@pytest.fixture(scope="module")
def step_with(tiny_policy, tiny_data):
    """step_with(**flags): the StepRecord of one rl_step with those Config values, run once per module."""
    done = {}

    def get(**given):
        key = tuple(sorted(given.items()))
        if key not in done:
            done[key] = run_step(tiny_policy, tiny_data, **given)
        return done[key]
    return get


@pytest.fixture(scope="module")
def base(step_with):
    """The paper's variant: timerpo, α = 0.3, OT grounding, ExpCoT target."""
    return step_with()


def rewards_and_w(record: StepRecord):
    return ([ep.reward.total for ep in record.episodes],
            np.array([np.nan if ep.grounding is None else ep.grounding for ep in record.episodes]))


# -- 1. the grounded advantage reaches the update ----------------------------------------------------------

def test_timerpo_advantage_reaches_the_update(base):
    """The objective receives A = Â_main + α·Â⊥_TsR, recomputed here in numpy from the episodes' rewards and W
    (test_advantage's oracles), and the grounded term is not negligible: it moves A off GRPO's."""
    rewards, W = rewards_and_w(base)
    assert rewards == REWARDS and np.isfinite(W).all()
    main = np_centre(rewards, G, "std")
    perp, _ = np_project(np_centre(np.exp(-W / 0.5), G, "std"), main, G)
    assert np.abs(0.3 * perp).max() > 0.05  # the check below can tell TimerPO from GRPO
    np.testing.assert_allclose(base.update_advantages.numpy(), main + 0.3 * perp, rtol=0, atol=1e-6)
    np.testing.assert_allclose([ep.advantage for ep in base.episodes], main + 0.3 * perp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("given, mode, alpha, grounding", [
    ({"alpha": 0.6}, "timerpo", 0.6, "ot"),
    ({"advantage": "grpo"}, "grpo", 0.0, "ot"),
    ({"advantage": "no-projection"}, "no-projection", 0.3, "ot"),
    ({"grounding": "cosine"}, "timerpo", 0.3, "cosine"),
    ({"cot": "gencot"}, "timerpo", 0.3, "ot"),
], ids=["alpha", "grpo", "no-projection", "cosine", "gencot"])
def test_each_variant_changes_what_it_should_and_nothing_else(base, step_with, given, mode, alpha, grounding):
    """Against the paper's variant on the same seeds: the completions are the same every time; W is the same
    unless the grounding or the OT target changed (and is not computed at all for GRPO); the update receives
    the advantage of the variant's own formula, from its own rewards and W."""
    record = step_with(**given)
    assert [ep.completion_ids for ep in record.episodes] == [ep.completion_ids for ep in base.episodes]
    rewards, W = rewards_and_w(record)
    _, base_W = rewards_and_w(base)
    if mode == "grpo":
        assert np.isnan(W).all() and record.targets is None  # no grounding work at all
        expected = np_centre(rewards, G, "std")
    else:
        if "grounding" in given or "cot" in given:
            assert np.abs(W - base_W).max() > 1e-3
        else:
            np.testing.assert_array_equal(W, base_W)
        expected = np_final(rewards, W, G, mode, alpha, "std", 0.5, grounding)
    assert np.abs(expected - np.array([ep.advantage for ep in base.episodes])).max() > 1e-3  # it did change
    np.testing.assert_allclose(record.update_advantages.numpy(), expected, rtol=0, atol=1e-6)


# -- 3. the OT target is what --cot says -------------------------------------------------------------------

@pytest.mark.parametrize("cot", ["expcot", "gencot"])
def test_make_prompt_targets_the_text_cot_names(tiny_policy, tiny_data, cot):
    samples = data_gen.load_samples(tiny_data)
    for i in PICKS:
        prompt = make_prompt(tiny_policy, tiny_data, samples, i, cot)
        assert samples[i].expcot != generic_cot()
        assert prompt.target_text == (samples[i].expcot if cot == "expcot" else generic_cot())


def text_states(policy, text: str, max_tokens: int) -> torch.Tensor:
    """The oracle: last-layer states of `text` alone (tokenized here, one sequence, no padding). [T, D]"""
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    with torch.no_grad():
        return policy.model.model.language_model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("cot", ["expcot", "gencot"])
def test_training_step_grounds_on_the_states_of_the_cot_text(step_with, tiny_policy, cot):
    """In rl_step, the OT target states are those of each sample's ExpCoT (the generic text for gencot), cut
    to --expcot-max-tokens, and W is the OT cost between them and the completion's states."""
    record = step_with() if cot == "expcot" else step_with(cot=cot)
    states, mask = record.targets
    texts = [p.sample.expcot if cot == "expcot" else generic_cot() for p in record.prompts]
    expected = [text_states(tiny_policy, t, 48) for t in texts]
    for g, want in enumerate(expected):
        assert int(mask[g].sum()) == len(want)
        assert torch.allclose(states[g, :len(want)], want, atol=1e-5, rtol=0)
    eps = record.episodes
    with torch.no_grad():
        batch = collate(tiny_policy, [ep.prompt.encoded for ep in eps], [ep.completion_ids for ep in eps])
        _, hidden, _ = completion_forward(tiny_policy, batch, with_hidden=True)  # [N, C, D]
    for i, ep in enumerate(eps):
        n, target = len(ep.completion_ids), expected[ep.group]
        w = ot.ot_distance(hidden[i:i + 1, :n], None, target[None], None, eps=0.08, n_iter=50)
        assert ep.grounding == pytest.approx(float(w), abs=1e-5)


# -- 5. the KL reference, and the OT target in train.py's own loop -----------------------------------------

def run_args(data, out, name, extra=()):
    """One RL step of 2 prompts x 2 completions of <= 4 tokens, β > 0, after a 1 + 2 step warm-up (tiny)."""
    return ["--data", data, "--eval-data", data, "--out", str(out), "--name", name, "--steps", "1",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--warmup-steps", "2",
            "--warmup-vision-steps", "1", "--eval-samples", "1", "--eval-every", "100", "--save-every", "100",
            "--micro-batch", "4", "--rollout-batch", "4", "--expcot-max-tokens", "16", "--beta", "0.001",
            "--no-progress", *extra]


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing(a: dict, b: dict) -> list[str]:
    """The names of the tensors that differ between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def train_and_watch(monkeypatch, args) -> list[dict]:
    """train.main(args), recording at every rl_step the policy's weights (before its update), the reference
    policy and its weights, and the prompts."""
    calls, real_step = [], train.rl_step

    def watch(policy, ref_policy, optimizer, prompts, step, config, *rest, **kw):
        calls.append({"policy": policy, "policy_weights": weights(policy.model), "ref": ref_policy,
                      "ref_weights": weights(ref_policy.model), "prompts": prompts})
        return real_step(policy, ref_policy, optimizer, prompts, step, config, *rest, **kw)

    monkeypatch.setattr(train, "rl_step", watch)
    assert train.main(args) == 0
    monkeypatch.undo()
    return calls


def assert_frozen_copy(call):
    ref, policy = call["ref"], call["policy"]
    assert ref.model is not policy.model
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.model.parameters(), policy.model.parameters()))
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_kl_reference_is_the_warmed_up_model_and_stays_it_on_resume(tiny_policy, tiny_data, tmp_path, monkeypatch):
    """Tiny path: the reference holds the weights the warm-up ended with (= the policy's before its first RL
    update), not the random initial ones. Resumed after that step, it still holds them, not the checkpoint's.
    The training loop's prompts target the ExpCoT (--cot expcot, the default)."""
    first = train_and_watch(monkeypatch, run_args(tiny_data, tmp_path, "warm"))[0]
    assert_frozen_copy(first)
    assert differing(first["ref_weights"], first["policy_weights"]) == []
    assert differing(first["ref_weights"], weights(tiny_policy.model))  # the warm-up moved them
    assert [p.target_text for p in first["prompts"]] == [p.sample.expcot for p in first["prompts"]]

    resumed = train_and_watch(monkeypatch, run_args(tiny_data, tmp_path, "warm", ["--steps", "2", "--resume"]))[0]
    assert differing(resumed["policy_weights"], first["policy_weights"])  # the checkpoint after step 1
    assert differing(resumed["ref_weights"], first["ref_weights"]) == []


def test_kl_reference_is_the_loaded_model_without_warm_up(tiny_data, tmp_path, monkeypatch):
    """A model folder and no warm-up (the Qwen path): the reference holds the folder's weights. The training
    loop's prompts target the generic text with --cot gencot."""
    from timerpo.policy import load_policy, save_policy

    folder = str(tmp_path / "model")
    save_policy(load_policy("tiny", seed=5), folder)  # weights unlike the tiny default's (seed 0)
    args = run_args(tiny_data, tmp_path, "loaded", ["--model", folder, "--warmup-steps", "0",
                                                    "--warmup-vision-steps", "0", "--cot", "gencot"])
    first = train_and_watch(monkeypatch, args)[0]
    assert_frozen_copy(first)
    assert differing(first["ref_weights"], weights(load_policy(folder).model)) == []
    assert differing(first["ref_weights"], first["policy_weights"]) == []
    assert all(p.target_text == generic_cot() for p in first["prompts"])
