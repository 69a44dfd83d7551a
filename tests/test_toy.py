"""Toy folders load with the Auto classes alone: ``AutoTokenizer`` gives the ids, text and chat template of the
tokenizer that saved the folder, ``AutoModelForCausalLM`` the model (issue 15, item 4)."""

import pytest
import torch
from conftest import arithmetic_prompt_completion
from transformers import AutoModelForCausalLM, AutoTokenizer

from wmss_trl.tasks import CHARSET
from wmss_trl.toy import (
    DEFAULT_CHARS,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_model,
    save_model_and_tokenizer,
    save_toy_checkpoints,
)


TEXTS = [
    "Ann has 13 pens. She gets 15. How many now?",
    "13+15=28\n28-8=20\n#### 20",
    "  two  spaces, a tab-less line:\n\n(3*4)/2 = 6? 'yes' it's 6.  ",
    "x",
    " leading space and trailing newline\n",
    "12 + 3 = 15\n\n 7+8 =15  ",
]
MESSAGES = [
    [{"role": "user", "content": "Ann has 2 pens. She gets 3. How many now?"}],
    [{"role": "user", "content": "1 + 2 = ?"}, {"role": "assistant", "content": "1+2=3\n#### 3"}],
]


def assert_same_tokenizer(loaded, original, chars):
    """Same size, special ids, ids, decoded text and chat template (ids, text and assistant mask)."""
    assert len(loaded) == len(original)
    for role in ("pad", "eos", "bos", "unk"):
        assert getattr(loaded, f"{role}_token_id") == getattr(original, f"{role}_token_id"), role
    texts = [t for t in TEXTS if set(t) <= set(chars)] + [chars]
    assert len(texts) >= 2
    for text in texts:
        ids = original(text)["input_ids"]
        assert len(ids) == len(text)  # one id per character
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == original.decode(ids) == text
    for messages in MESSAGES:
        for add_generation_prompt in (False, True):
            kw = dict(add_generation_prompt=add_generation_prompt)
            assert loaded.apply_chat_template(messages, tokenize=False, **kw) == original.apply_chat_template(
                messages, tokenize=False, **kw
            )
        got = loaded.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        want = original.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert got["input_ids"] == want["input_ids"]
        assert got["assistant_masks"] == want["assistant_masks"]
    batch = [original.apply_chat_template(m, tokenize=False) for m in MESSAGES]
    assert loaded(batch)["input_ids"] == original(batch)["input_ids"]


@pytest.mark.parametrize("chars", [DEFAULT_CHARS, CHARSET, "0123456789+= \n"])
def test_saved_toy_folder_loads_with_auto_classes(tmp_path, chars):
    tok = build_char_tokenizer(chars)
    model = build_tiny_model(tok, seed=3)
    path = save_model_and_tokenizer(model, tok, str(tmp_path / "toy"))
    assert_same_tokenizer(AutoTokenizer.from_pretrained(path), tok, chars)
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_ids_are_specials_then_characters_in_order():
    """The vocabulary's order (and so every toy model's embedding rows) is: special tokens, then ``chars``."""
    tok = build_char_tokenizer(DEFAULT_CHARS)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    first = len(SPECIAL_TOKENS)
    assert [tok(ch)["input_ids"] for ch in DEFAULT_CHARS] == [[first + i] for i in range(len(DEFAULT_CHARS))]
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_CHARS)


def test_characters_outside_the_vocabulary_are_dropped_by_both(tmp_path):
    """As Qwen2Tokenizer does (no unknown token in its BPE): the saving and the loaded tokenizer agree."""
    tok = build_char_tokenizer("abc ")
    loaded = AutoTokenizer.from_pretrained(save_model_and_tokenizer(build_tiny_model(tok), tok, str(tmp_path / "t")))
    for text in ("a~b", "café", "a\nb", "xyz"):
        kept = "".join(c for c in text if c in "abc ")
        assert loaded(text)["input_ids"] == tok(text)["input_ids"] == tok(kept)["input_ids"]


def test_non_ascii_characters_are_refused():
    with pytest.raises(ValueError, match="ASCII"):
        build_char_tokenizer("abcé")


def test_save_toy_checkpoints(tmp_path):
    weak, strong = save_toy_checkpoints(str(tmp_path / "toy"))
    assert (weak, strong) == (str(tmp_path / "toy" / "weak"), str(tmp_path / "toy" / "strong"))
    w, s = AutoModelForCausalLM.from_pretrained(weak), AutoModelForCausalLM.from_pretrained(strong)
    assert w.config.to_dict() | {"_name_or_path": ""} == s.config.to_dict() | {"_name_or_path": ""}
    assert not torch.equal(w.lm_head.weight, s.lm_head.weight)
    assert AutoTokenizer.from_pretrained(weak).get_vocab() == AutoTokenizer.from_pretrained(strong).get_vocab()
    assert_same_tokenizer(AutoTokenizer.from_pretrained(strong), build_char_tokenizer(), DEFAULT_CHARS)


def test_demo_weak_and_strong_folders_load_with_auto_classes(tmp_path):
    """The demo's weak and strong folders (written by its TRL SFT phases, one step each here)."""
    from wmss_trl.recipes.demo import sft_phase

    tok = build_char_tokenizer(CHARSET)
    train = arithmetic_prompt_completion(8)
    weak = sft_phase(build_tiny_model(tok, seed=0), tok, train, str(tmp_path / "weak"), 0, 1, 3e-3, 4)
    strong = sft_phase(weak, tok, train, str(tmp_path / "strong"), 0, 1, 3e-3, 4)
    for path in (weak, strong):
        assert_same_tokenizer(AutoTokenizer.from_pretrained(path), tok, CHARSET)
        _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info


def test_greedy_completions_match_one_prompt_at_a_time_and_restore_padding(tiny):
    """The batched, left-padded greedy loop of the evaluations gives each prompt the completion that decoding it alone
    (no padding) gives, and leaves the tokenizer's padding side as it found it, also when the loop stops early."""
    from datasets import Dataset

    from wmss_trl.tasks import greedy_completions

    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    tok = AutoTokenizer.from_pretrained(tiny["strong"])
    tok.padding_side = "right"
    prompts = [[{"role": "user", "content": q}] for q in ("1+2=", "13+15=", "7*8-3=", "2=")]
    data = Dataset.from_list([{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)])
    batched = [t for _, texts in greedy_completions(model, tok, data, batch_size=3, max_new_tokens=8) for t in texts]
    assert tok.padding_side == "right"
    alone = []
    for p in prompts:
        ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)  # fmt: skip
        alone.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert batched == alone
    loop = greedy_completions(model, tok, data, batch_size=2, max_new_tokens=4)
    next(loop)
    assert tok.padding_side == "left"
    loop.close()  # an evaluation that stops early (an exception in the caller closes it the same way)
    assert tok.padding_side == "right"
