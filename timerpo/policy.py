"""The policy: loading Qwen2.5-VL (real or the embedded tiny one), saving it, and encoding prompts.

Everything model-specific lives here, so the rollout and the objective only see token ids, masks and
pixel blocks. We do not use `Qwen2_5_VLProcessor`: without torchvision its constructor fails
(method.md §17), and the chat layout is three lines of string formatting anyway.

Chat layout of one prompt (the Qwen2.5-VL template, one image, N = image tokens):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|> x N<|vision_end|>PROMPT<|im_end|>\\n
    <|im_start|>assistant\\n
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from timerpo.files import make_temp_dir, replace_dir, set_usual_modes
from timerpo.precision import cast_parameters

HUB_IDS = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
SYSTEM_PROMPT = "You are a helpful assistant."
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# A sampled vision token would make the next forward look for an image that is not there.
FORBIDDEN_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
IMAGE_TOKEN = "<|image_pad|>"
# Qwen2.5-VL: 14 px patches merged 2 x 2, so one visual token covers 28 x 28 px (data_gen.visual_tokens).
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28
ADAPTER_CONFIG = "adapter_config.json"  # marks a folder of LoRA adapters (peft's format)


class ModelNotFound(Exception):
    """The requested weights are not on this machine; the message says how to get them."""


@dataclass
class Policy:
    """A Qwen2.5-VL model with the tokenizer and image processor that go with it."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil
    name: str
    # Under torchrun --dist ddp: the DDP wrapper of `model`. Scoring forwards go through it so that the
    # backward all-reduces gradients; everything else (sampling, saving) uses `model` itself.
    wrapper: torch.nn.Module | None = None
    # Mixed precision (timerpo/precision.py). `autocast_dtype`: the dtype the update's forwards compute in over
    # fp32 master weights (None: the weights' own dtype). `rollout_model`: a low-precision copy of the weights
    # that sampling and no-grad forwards use, refreshed after every optimizer step (None: sample with `model`).
    autocast_dtype: torch.dtype | None = None
    rollout_model: torch.nn.Module | None = None
    # Sampling engine (timerpo/rollout.py): compile the decode step with torch.compile, and the decoder that
    # keeps its preallocated KV cache between calls when it is compiled.
    compile_decode: bool = False
    decoder: object | None = None
    # LoRA (timerpo/lora.py): the peft wrapper of `model`, whose adapter layers sit inside `model` itself
    # (None: full fine-tuning).
    adapters: object | None = None
    # Where forwards run when the weights live elsewhere (FSDP's CPU offload keeps them in host memory);
    # None: where the weights are.
    compute_device: torch.device | None = None

    @property
    def sampler(self) -> torch.nn.Module:
        """The weights rollouts, evaluations and other no-grad forwards run with."""
        return self.rollout_model if self.rollout_model is not None else self.model

    @property
    def forward_module(self) -> torch.nn.Module:
        """The module whose forward scores completions: the DDP wrapper when there is one, else the model."""
        return self.wrapper if self.wrapper is not None else self.model

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def end_ids(self) -> list[int]:
        return [self.token_id(t) for t in END_TOKENS]

    @property
    def forbidden_ids(self) -> list[int]:
        return [self.token_id(t) for t in FORBIDDEN_TOKENS]

    @property
    def pad_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def device(self) -> torch.device:
        """Where inputs go: the compute device, which is the weights' own unless they are offloaded."""
        return self.compute_device or next(self.model.parameters()).device


@dataclass
class EncodedPrompt:
    """One (image, prompt) pair, tokenized and unpadded. Shared by the G episodes of its group."""

    input_ids: list[int]  # chat-formatted prompt, image tokens expanded
    pixel_values: torch.Tensor  # [n_patches, 3*2*14*14]: this image's patch rows
    image_grid_thw: torch.Tensor  # [3]: (t, h, w) in 14 px patches


def make_image_processor(image_mean=None, image_std=None) -> Qwen2VLImageProcessorPil:
    """The PIL image processor with pixel limits that keep our renders at their native size.

    `image_mean`/`image_std` (per RGB channel, on the 0..1 scale) replace Qwen's CLIP statistics; the tiny
    model uses white-centred ones (timerpo/tiny.py). None keeps the processor's own (the Qwen checkpoints').
    """
    stats = {k: list(v) for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **stats)


def saved_image_stats(folder: str) -> dict:
    """The normalisation a model folder was trained with (its preprocessor_config.json), or {} if none.

    Only the mean and std are taken: the pixel limits stay ours, so plots keep their native size.
    """
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    return {k: config[k] for k in ("image_mean", "image_std") if k in config}


def chat_text(prompt: str, n_image_tokens: int) -> str:
    """The Qwen2.5-VL chat layout for one user turn holding one image, ready for the assistant."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{IMAGE_TOKEN * n_image_tokens}<|vision_end|>"
        f"{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


def encode_prompt(policy: Policy, image: Image.Image, prompt: str) -> EncodedPrompt:
    """Tokenize one (image, prompt) pair in the chat layout, with as many image tokens as patches allow."""
    pix = policy.image_processor(images=[image.convert("RGB")], return_tensors="pt")
    grid = pix["image_grid_thw"][0]  # [3]
    merge = policy.image_processor.merge_size
    n_image_tokens = int(grid.prod()) // (merge * merge)
    ids = policy.tokenizer(chat_text(prompt, n_image_tokens), add_special_tokens=False)["input_ids"]
    assert ids.count(policy.token_id(IMAGE_TOKEN)) == n_image_tokens, "image tokens were merged by the tokenizer"
    return EncodedPrompt(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=grid)


def encode_text(policy: Policy, text: str, max_tokens: int) -> list[int]:
    """Plain text (no chat layout, no image) as token ids, cut to max_tokens. Used for the ExpCoT."""
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]


# ----------------------------------------------------------------------------------------------------
# loading and saving


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


def squashed(name: str) -> str:
    """A model name without case, dashes, underscores, dots or spaces: 'Qwen2.5-VL-3B' -> 'qwen25vl3b'."""
    return re.sub(r"[-_.\s]", "", name.lower())


def closest_known_model(name: str) -> str | None:
    """The known name (tiny, a short name, a hub id) that `name` most nearly spells, or None.

    Near misses are case, a missing or extra dash or dot, a dropped or wrong size letter:
    'qwen2.5vl-3b', 'Qwen2.5-VL-3B' and 'qwen2.5-vl-3' all give 'qwen2.5-vl-3b'.
    """
    known = {squashed(k): k for k in ("tiny", *HUB_IDS, *HUB_IDS.values())}
    match = difflib.get_close_matches(squashed(name), list(known), n=1, cutoff=0.75)
    return known[match[0]] if match else None


def looks_like_folder(name: str) -> bool:
    """A path, not a hub id: an existing folder, or a path that cannot be an 'org/name' id."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")
    return os.path.isdir(name) or (not hub_id and (os.path.sep in name or name.startswith(".")))


def check_weights_folder(folder: str) -> str:
    """`folder` if it holds a saved model (config.json and safetensors weights), else ModelNotFound."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelNotFound(f"No model folder at '{folder}' (expected a config.json from save_pretrained there).")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in SAFETENSORS_FILES):
        # pickled weights (pytorch_model.bin) are never loaded: unpickling a file from a shared folder can run code
        raise ModelNotFound(f"'{folder}' has no file named model.safetensors (or model.safetensors.index.json); "
                            f"weights load from safetensors only, never from pickles.")
    return folder


def cached_snapshot(hub_id: str) -> str | None:
    """The local Hugging Face cache's folder of `hub_id` (its main revision) when config.json is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(hub_id, "config.json")
    except ValueError:  # not a valid repository id
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def find_model(name: str) -> str:
    """Where the weights of --model `name` are on this machine, found without loading them or the network.

    'tiny' stays 'tiny' (built in memory); a folder of LoRA adapters is passed on as it is. A model folder must
    hold config.json and safetensors weights. A short name (qwen2.5-vl-3b) or any other name is looked up in
    the local Hugging Face cache, as a hub id. Raises ModelNotFound with one sentence: how to fetch known weights, or the known name a near miss meant.
    """
    if name == "tiny":
        return name
    if os.path.isfile(os.path.join(name, ADAPTER_CONFIG)):  # LoRA adapters: their loader finds their base
        return name
    if looks_like_folder(name):
        return check_weights_folder(name)
    hub_id = HUB_IDS.get(name, name)
    snapshot = cached_snapshot(hub_id)
    if snapshot is not None:
        return check_weights_folder(snapshot)
    if hub_id in HUB_IDS.values():
        raise ModelNotFound(f"The weights of '{hub_id}' are not on this machine; fetch them once with "
                            f"`hf download {hub_id}` (or pass --model /path/to/a/local/folder).")
    known = f"tiny, {', '.join(HUB_IDS)}, a model folder, or a hub id in the local Hugging Face cache"
    guess = closest_known_model(name)
    if guess is not None:
        raise ModelNotFound(f"Unknown model '{name}': did you mean {guess}? (--model takes {known})")
    raise ModelNotFound(f"Unknown model '{name}': neither a model folder nor in the local Hugging Face cache "
                        f"(--model takes {known}; fetch a hub model once with `hf download {name}`).")


def load_policy(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                tiny_numbers: str = "digits") -> Policy:
    """Load `tiny` (built here, no download), a short name, a hub id from the local cache, a model folder, or
    a folder of LoRA adapters (its base model with the adapters merged in: timerpo/lora.py).

    Never touches the network: find_model locates the weights first and raises ModelNotFound with one
    sentence when they are not here. Weights load from safetensors only. With a low-precision `dtype` the
    parameters take it and the buffers (rotary inverse frequencies) stay fp32, as in every bf16 model the
    project makes (timerpo/precision.py).
    """
    path = find_model(name)
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):  # LoRA adapters: their base with them merged in
        from timerpo.lora import load_merged

        return _to(load_merged(path, device=device, seed=seed), dtype, device)
    if path == "tiny":
        from timerpo.tiny import build_tiny_policy

        return _to(build_tiny_policy(seed=seed, numbers=tiny_numbers), dtype, device)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                                   use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"Could not load the model folder '{path}': {err}") from None
    policy = Policy(model=model, tokenizer=tokenizer, image_processor=make_image_processor(**saved_image_stats(path)),
                    name=name)
    return _to(policy, dtype, device)


def _to(policy: Policy, dtype: torch.dtype, device: str) -> Policy:
    """Move to `device`; cast the parameters, not the buffers, to `dtype`."""
    cast_parameters(policy.model.to(device=device), dtype)
    return policy


def save_policy(policy: Policy, out_dir: str, state_dict: dict | None = None) -> None:
    """Save in the hub's format (`from_pretrained` loads it back), atomically: write beside, then rename.

    `state_dict` replaces the model's own tensors (FSDP: the gathered full state dict, on rank 0).
    """
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent)  # mkdtemp's 0700 would stay on the renamed folder
    try:
        policy.model.save_pretrained(tmp, state_dict=state_dict)
        policy.tokenizer.save_pretrained(tmp)
        policy.image_processor.save_pretrained(tmp)
        set_usual_modes(tmp)  # the weights file comes out 0600 from safetensors
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
