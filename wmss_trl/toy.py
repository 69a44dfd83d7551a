"""Tiny models and tokenizers built locally from config: no hub, no download.

Used by the embedded demo, the tests and the docs' examples (:func:`save_toy_checkpoints`). The tokenizer is
character-level: one id per character, plus special tokens, with a small ChatML-like chat template (with generation
tags, so TRL's ``assistant_only_loss`` works). It is built the way transformers' ``Qwen2Tokenizer`` rebuilds a qwen2
folder's tokenizer (a byte-level BPE with no merges, behind Qwen2's pre-tokenizer split), so a saved folder loads
with ``AutoTokenizer`` alone and gives the same ids and text as the tokenizer that saved it.
"""

from __future__ import annotations

import os
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
DEFAULT_CHARS = string.digits + string.ascii_letters + " +-*/=()?.,:#\n'"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|user|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per (ASCII) character, plus special tokens. Deterministic.

    Ids: the special tokens first, then ``chars`` in order. Each character is stored under its byte-level symbol
    (space -> "Ġ", newline -> "Ċ"), so that ``Qwen2Tokenizer`` (what ``AutoTokenizer`` loads for a qwen2 folder) reads
    the same vocabulary; with no merges, BPE then maps every character to its own id. A character outside ``chars``
    is dropped, as ``Qwen2Tokenizer`` drops it (its BPE has no unknown token), so the tokenizer that saved a folder and
    the one ``AutoTokenizer`` loads from it agree on every text; ``<unk>`` stays a special token that no text maps to.
    """
    if any(ord(ch) > 127 for ch in chars):
        raise ValueError("build_char_tokenizer takes ASCII characters only (one byte, so one id, per character).")
    byte_symbol = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(byte_symbol[ord(ch)], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|end|>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<eos>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized to ``tokenizer``; deterministic for a given seed."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model_and_tokenizer(model, tokenizer, path: str) -> str:
    """Save ``model`` (safetensors) and ``tokenizer`` to the folder ``path``; return ``path``."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str):
    """Load a tokenizer saved by this module: plain ``AutoTokenizer`` (kept as a name for existing callers)."""
    return AutoTokenizer.from_pretrained(path)


def save_toy_checkpoints(root: str, chars: str = DEFAULT_CHARS) -> tuple[str, str]:
    """Save a weak and a strong checkpoint of one tiny toy model to ``root/weak`` and ``root/strong``.

    They stand in for your own checkpoints in the docs' examples: two local folders, each with a config, a
    ``model.safetensors`` and the same character tokenizer (built from ``chars``), that load with
    ``AutoModelForCausalLM`` / ``AutoTokenizer``. Same architecture, different random weights (seeds 2 and 1);
    neither is trained, so their answers are noise. Returns ``(weak_path, strong_path)``.
    """
    tok = build_char_tokenizer(chars)
    weak = save_model_and_tokenizer(build_tiny_model(tok, seed=2), tok, os.path.join(root, "weak"))
    strong = save_model_and_tokenizer(build_tiny_model(tok, seed=1), tok, os.path.join(root, "strong"))
    return weak, strong
