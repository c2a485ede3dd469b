import os
import sys

# Tests import the flat top-level modules (data_gen, ot, ...) from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Never touch the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_policy():
    """The embedded tiny Qwen2.5-VL (random weights, small tokenizer), built once per test session."""
    from timerpo.tiny import build_tiny_policy

    return build_tiny_policy(seed=0)


@pytest.fixture(scope="session")
def preset_tiny_policy():
    """The tiny model as `python train.py` builds it (the tiny preset's number tokens), built once per session:
    what a run's weights start from."""
    import train
    from timerpo.tiny import build_tiny_policy

    return build_tiny_policy(seed=0, numbers=train.TINY["tiny_numbers"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small generated anomllm set (3 per family) with images, as train.py would read it."""
    import data_gen

    folder = str(tmp_path_factory.mktemp("data") / "train")
    data_gen.generate(folder, "anomllm", 3, 11, progress=False)
    return folder
