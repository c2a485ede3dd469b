"""The embedded default policy: a tiny Qwen2.5-VL with random weights and a small offline tokenizer.

Why a small tokenizer and not Qwen's 151,936-token one: on CPU the tiny model's sampling time is
dominated by the full-vocabulary softmax (method.md §17), so a ~1k-token byte-level BPE trained in a
fraction of a second on the project's own text makes every rollout several times cheaper. It keeps the
Qwen chat and vision special tokens, so every code path (chat layout, image tokens, 3-D positions, end
tokens, forbidden tokens) is the one the real checkpoints use. BPE training is deterministic, so the same
seed gives the same tokenizer and the same model.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import data_gen
from timerpo.policy import Policy, make_image_processor

# Same strings as Qwen2.5-VL; the ids differ (they are the first entries of the small vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
TINY_VOCAB = 1024
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)
# Plots are ~96 % white. Qwen's CLIP statistics map white to ~(1.9, 2.1, 2.1), so every visual token
# carries one large shared background component and the line is a small perturbation of it (pairwise
# token cosine 0.93 at init). Centring on white makes background pixels 0 and leaves the line, grid and
# text as the signal: the across-plot variance of a token at a fixed position, relative to its mean,
# goes from 0.03 to 0.63, and of the pooled tokens from 3e-4 to 7e-2 (bench/vision_probe.py).
TINY_IMAGE_MEAN = (1.0, 1.0, 1.0)
TINY_IMAGE_STD = (0.5, 0.5, 0.5)
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = TINY_VOCAB,
                         whole_numbers: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with one token per digit (as Qwen does), plus the Qwen special tokens.

    `whole_numbers` = L adds one token for every integer 0..L: an interval end is then one
    decision, not three digits. They are matched before the BPE (longest first), so "[[188, 356]]" gives the
    tokens "188" and "356"; a larger number falls back to its longest leading match ("1234" → "123", "4")
    and decoding stays the identity on any text.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
    )
    if whole_numbers is not None:
        tokenizer.add_tokens([str(i) for i in range(whole_numbers + 1)])
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the real architecture at toy width and depth."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    # mrope splits the head_dim/2 rotary frequencies into (temporal, height, width) in the 3B's
    # proportions 16:24:24 of 64; for head_dim 32 that is [4, 6, 6].
    half = head_dim // 2
    spatial = half * 3 // 8
    mrope_section = [half - 2 * spatial, spatial, spatial]
    text = dict(
        TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_policy(seed: int = 0, numbers: str = "digits") -> Policy:
    """The default `--model tiny`: built on the spot, no files, no network, same seed → same weights.
    `numbers`: digits (one token per digit, as Qwen) | whole (one token per integer 0..L, L the longest series
    of the generated suites)."""
    whole = max(data_gen.SUITE_LENGTH.values()) if numbers == "whole" else None
    tokenizer = build_tiny_tokenizer(data_gen.tokenizer_corpus(), whole_numbers=whole)
    config = tiny_config(tokenizer)
    devices = []  # fork_rng needs an explicit list on CPU-only machines to stay quiet
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return Policy(model=model, tokenizer=tokenizer, image_processor=make_image_processor(TINY_IMAGE_MEAN, TINY_IMAGE_STD), name="tiny")
