"""Checkpoint pieces in one process: the trainer state as JSON, optimizer shards read back with another
number of ranks, and damaged or hostile files refused with a clear error."""
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.planted import payload
from tests.test_distributed import assert_same_optimizer_state, stepped_optimizer
from timerpo.checkpoint import (STATE_FILE, CheckpointError, load_optimizer, load_trainer_state, prune_checkpoints,
                                read_rows, rng_from_json, rng_state, rng_to_json, save_optimizer, save_trainer_state,
                                set_rng_state)
from timerpo.distributed import SINGLE
from timerpo.policy import ModelNotFound, load_policy, save_policy


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random(), random.gauss(0, 1)


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(), random.gauss(0, 1)  # both keep a cached Gaussian, which the state must carry
    numbers = json.loads(json.dumps(rng_to_json(rng_state())))
    expected = draws()
    set_rng_state(rng_from_json(numbers))
    assert draws() == expected


def test_trainer_state_is_json_and_loads_back(tmp_path):
    torch.manual_seed(4)
    save_trainer_state(str(tmp_path), 7, {"args": {"lr": 0.1}})
    expected = draws()
    with open(tmp_path / STATE_FILE) as f:
        raw = json.load(f)
    assert raw["step"] == 7 and raw["extra"] == {"args": {"lr": 0.1}} and len(raw["rng"]["torch"]) == 5056
    state = load_trainer_state(str(tmp_path))
    assert state["step"] == 7 and not state["pickled"]
    set_rng_state(state["rng"])
    assert draws() == expected


@pytest.mark.parametrize("damage", ["not json", "short torch state", "step as text", "python state",
                                    "newer format"])
def test_damaged_trainer_state_is_a_clear_error(tmp_path, damage):
    save_trainer_state(str(tmp_path), 3, {})
    path = tmp_path / STATE_FILE
    raw = json.loads(path.read_text())
    if damage == "short torch state":
        raw["rng"]["torch"] = raw["rng"]["torch"][:10]
    elif damage == "step as text":
        raw["step"] = "3"
    elif damage == "python state":
        raw["rng"]["python"]["internal"] = [2 ** 40] * 625
    elif damage == "newer format":
        raw["format"] = 2
    path.write_text("{" if damage == "not json" else json.dumps(raw))
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="is not a readable trainer state"):
        load_trainer_state(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), before)  # nothing was applied


def test_folder_without_trainer_state_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="holds no trainer_state.json"):
        load_trainer_state(str(tmp_path))


def test_rows_come_back_from_pieces_of_another_number_of_ranks(tmp_path):
    """3 ranks wrote rows 0-1, 2-3 and 4 of a 5 x 2 tensor; 2 ranks need rows 0-2 and 3-4."""
    full = torch.arange(10.0).reshape(5, 2)
    cuts = [(0, 2), (2, 4), (4, 5)]
    for r, (a, b) in enumerate(cuts):
        save_file({"w/exp_avg": full[a:b].contiguous()}, str(tmp_path / f"rank-{r:05d}.safetensors"))
    entry = {"shape": [5, 2], "pieces": [{"file": f"rank-{r:05d}.safetensors", "rows": list(c)}
                                         for r, c in enumerate(cuts)]}
    files = {f"rank-{r:05d}.safetensors": safe_open(str(tmp_path / f"rank-{r:05d}.safetensors"), framework="pt")
             for r in range(3)}
    assert torch.equal(read_rows(files, "w/exp_avg", entry, (0, 3)), full[0:3])
    assert torch.equal(read_rows(files, "w/exp_avg", entry, (3, 5)), full[3:5])
    assert torch.equal(read_rows(files, "w/exp_avg", entry, None), full)
    assert read_rows(files, "w/exp_avg", entry, (2, 2)).shape == (0, 2)  # a rank with no rows of it
    del entry["pieces"][1]
    with pytest.raises(ValueError, match="do not hold its rows 2 to 5"):
        read_rows(files, "w/exp_avg", entry, None)


@pytest.fixture
def saved_optimizer(tiny_policy, tmp_path):
    pol, opt = stepped_optimizer(tiny_policy)
    folder = str(tmp_path / "optimizer")
    save_optimizer(pol, opt, folder, SINGLE)
    return pol, opt, folder


def edit_index(folder, change):
    path = os.path.join(folder, "index.json")
    with open(path) as f:
        index = json.load(f)
    change(index)
    with open(path, "w") as f:
        json.dump(index, f)


def test_index_must_not_point_outside_the_checkpoint(saved_optimizer, tmp_path):
    pol, _, folder = saved_optimizer
    os.rename(os.path.join(folder, "rank-00000.safetensors"), tmp_path / "elsewhere.safetensors")

    def point_outside(index):
        for entry in index["tensors"].values():
            entry["pieces"][0]["file"] = "../elsewhere.safetensors"
    edit_index(folder, point_outside)
    with pytest.raises(CheckpointError, match="not a rank-NNNNN.safetensors file"):
        load_optimizer(pol, torch.optim.AdamW(pol.model.parameters()), folder, SINGLE)


def test_missing_optimizer_state_names_the_likely_cause(saved_optimizer):
    pol, _, folder = saved_optimizer
    key = "model.visual.blocks.0.attn.qkv.weight/exp_avg"
    edit_index(folder, lambda index: index["tensors"].pop(key))
    with pytest.raises(CheckpointError, match=f"the checkpoint has no state {key} .*--freeze-vision"):
        load_optimizer(pol, torch.optim.AdamW(pol.model.parameters()), folder, SINGLE)


def test_wrong_rows_in_a_piece_are_a_clear_error(saved_optimizer):
    pol, opt, folder = saved_optimizer
    key = "model.visual.blocks.0.attn.qkv.weight/exp_avg"
    edit_index(folder, lambda index: index["tensors"][key]["pieces"][0].update(rows=[0, 1]))
    with pytest.raises(CheckpointError, match="cannot load the optimizer state"):
        load_optimizer(pol, torch.optim.AdamW(pol.model.parameters()), folder, SINGLE)
    edit_index(folder, lambda index: index["tensors"][key]["pieces"][0].update(rows=None))
    fresh = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)
    load_optimizer(pol, fresh, folder, SINGLE)  # repaired: loads again
    assert_same_optimizer_state(opt, fresh)


def test_model_folder_with_pickled_weights_only_is_refused(tiny_policy, tmp_path):
    folder = tmp_path / "model"
    save_policy(tiny_policy, str(folder))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(payload(marker))
    with pytest.raises(ModelNotFound, match="no file named model.safetensors"):
        load_policy(str(folder))
    assert not marker.exists()


def test_prune_keeps_the_newest_n_checkpoints_and_zero_keeps_all(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"ckpt-{step:06d}").mkdir()
        (tmp_path / f"ckpt-{step:06d}" / STATE_FILE).write_text("{}")
    (tmp_path / "latest").write_text("ckpt-000004\n")
    prune_checkpoints(str(tmp_path), 0)
    assert len(list(tmp_path.glob("ckpt-*"))) == 4
    prune_checkpoints(str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000004"]
