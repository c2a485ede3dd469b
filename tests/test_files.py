"""Atomic writes leave files and folders with the mode the umask gives (not mkstemp's 0600), and so do
checkpoints and generated data."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import data_gen
from timerpo.checkpoint import save_checkpoint
from timerpo.files import make_temp_dir, set_usual_modes, write_atomic
from timerpo.plots import line_chart


@pytest.fixture
def umask():
    """os.umask, for a test to set the umask it runs under; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_atomic(str(tmp_path / "a.json"), "{}\n")
    write_atomic(str(tmp_path / "b.png"), b"\x89PNG")
    assert mode(tmp_path / "a.json") == file_mode and mode(tmp_path / "b.png") == file_mode
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert mode(make_temp_dir(str(tmp_path))) == dir_mode
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))  # safetensors itself writes 0600
    set_usual_modes(str(tmp_path))
    assert mode(tmp_path / "w.safetensors") == file_mode
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".") and not (tmp_path / n).is_dir()]
    assert leftovers == []  # no temporary file or mode probe left behind


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    write_atomic(str(target), "old")
    with pytest.raises(TypeError):
        write_atomic(str(target), 42)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_checkpoint_is_readable_by_the_group(tmp_path, umask, tiny_policy):
    umask(0o027)
    run = tmp_path / "run"
    run.mkdir()
    opt = torch.optim.AdamW(tiny_policy.model.parameters())
    save_checkpoint(str(run), 1, tiny_policy, opt)
    paths = [os.path.join(parent, n) for parent, dirs, files in os.walk(run) for n in dirs + files]
    assert any(p.endswith("model.safetensors") for p in paths) and any(p.endswith("index.json") for p in paths)
    for path in paths:
        assert mode(path) == (0o750 if os.path.isdir(path) else 0o640), path


def test_curves_are_written_atomically_and_readable_by_the_group(tmp_path, umask):
    from PIL import Image

    umask(0o027)
    line_chart({"reward": ([1, 2, 3], [0.1, 0.3, 0.2])}, str(tmp_path / "curves.png"), title="run")
    assert mode(tmp_path / "curves.png") == 0o640 and os.listdir(tmp_path) == ["curves.png"]
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size == (720, 360)


def test_generated_data_is_readable_by_the_group(tmp_path, umask):
    umask(0o027)
    folder = tmp_path / "data"
    data_gen.generate(str(folder), "anomllm", 1, 5, progress=False)
    paths = [os.path.join(parent, n) for parent, dirs, files in os.walk(folder) for n in dirs + files]
    assert any(p.endswith("samples.jsonl") for p in paths) and any(p.endswith(".png") for p in paths)
    for path in paths:
        assert mode(path) == (0o750 if os.path.isdir(path) else 0o640), path
