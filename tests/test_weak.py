"""The weak/strong compatibility check (`check_weak_compatible`) at every entry point: a weak model whose tokenizer
has the strong one's vocabulary permuted (same size, other ids) is refused as a path, as a loaded model (SFT, GRPO),
in `mine_negatives()` and in `wmss mine-negatives`; a loaded model with no tokenizer to compare is checked on its
config and embeddings, with a warning."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_prompt_completion, cpu_args
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from mine_common import mining_prompts, parity_verifier  # noqa: E402

from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer, save_model_and_tokenizer  # noqa: E402
from wmss_trl.weak import check_weak_compatible  # noqa: E402


REFUSED = r"do not share a tokenizer .*different token -> id maps: \d+ of 84 tokens have another id"
NOT_COMPARED = "could not compare the tokenizers"
MINING = dict(num_samples=2, max_new_tokens=3, batch_size=2, chunk_size=2, keep_truncated=True, progress=False)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def without_tokenizer(model, folder) -> torch.nn.Module:
    """``model`` saved alone (no tokenizer files in its folder) and loaded back: its tokenizer cannot be found."""
    model.save_pretrained(str(folder))
    return load(str(folder))


def tokenizer_warnings(record):
    return [w for w in record if NOT_COMPARED in str(w.message)]


def test_permuted_vocabulary_refused_as_a_path(tiny, permuted_weak):
    tok = load_tokenizer(tiny["strong"])
    with pytest.raises(ValueError, match=REFUSED):
        check_weak_compatible(tiny["strong"], permuted_weak["path"], tok, permuted_weak["path"])
    # the tokenizer is looked up in the weak folder also when no tokenizer path is given, and on the strong side in
    # the strong folder when no tokenizer is given (DPO with processing_class=None)
    with pytest.raises(ValueError, match=REFUSED):
        check_weak_compatible(tiny["strong"], permuted_weak["path"], tok)
    with pytest.raises(ValueError, match=REFUSED):
        check_weak_compatible(tiny["strong"], permuted_weak["path"])


def test_permuted_vocabulary_refused_as_a_loaded_model(tiny, permuted_weak):
    weak = load(permuted_weak["path"])  # config._name_or_path is its folder, which holds its tokenizer
    with pytest.raises(ValueError, match=REFUSED + r".*copy the strong model's tokenizer") as e:
        check_weak_compatible(load(tiny["strong"]), weak, load_tokenizer(tiny["strong"]))
    # both sides named, with where each tokenizer came from
    message = str(e.value)
    assert f"weak model ({permuted_weak['path']})" in message and f"strong model ({tiny['strong']})" in message
    assert f"weak tokenizer from {permuted_weak['path']}" in message


def test_sft_refuses_a_loaded_permuted_weak_model(tiny, permuted_weak, tmp_path):
    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer

    with pytest.raises(ValueError, match=REFUSED):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path),
            train_dataset=arithmetic_prompt_completion(8),
            processing_class=load_tokenizer(tiny["strong"]),
            weak_model=load(permuted_weak["path"]),
        )


def test_grpo_refuses_a_loaded_permuted_weak_model(tiny, permuted_weak, tmp_path):
    from grpo_common import grpo_args, has_digit, prompt_dataset

    from wmss_trl import WMSSGRPOTrainer

    with pytest.raises(ValueError, match=REFUSED):
        WMSSGRPOTrainer(
            tiny["strong"],
            has_digit,
            args=grpo_args(tmp_path, beta=0.04),
            train_dataset=prompt_dataset(8),
            processing_class=load_tokenizer(tiny["strong"]),
            weak_model=load(permuted_weak["path"]),
        )


@pytest.mark.parametrize("tokenizer_of", ["strong", "weak"])
def test_mine_negatives_refuses_a_permuted_weak_model(tiny, permuted_weak, tmp_path, tokenizer_of):
    """Whichever of the two tokenizers is passed (it serves both models), the pair is refused before mining."""
    from wmss_trl.negatives import mine_negatives

    tok = load_tokenizer(tiny["strong"]) if tokenizer_of == "strong" else load_tokenizer(permuted_weak["path"])
    with pytest.raises(ValueError, match=REFUSED):
        mine_negatives(
            mining_prompts(),
            load(permuted_weak["path"]),
            load(tiny["strong"]),
            tok,
            [parity_verifier],
            output_dir=str(tmp_path / "mined"),
            **MINING,
        )
    assert not (tmp_path / "mined").exists()


def test_mine_negatives_refuses_a_tokenizer_that_is_not_the_models(tiny, permuted_weak, tmp_path):
    from wmss_trl.negatives import mine_negatives

    with pytest.raises(ValueError, match=REFUSED):
        mine_negatives(
            mining_prompts(),
            load(tiny["weak"]),
            load(tiny["strong"]),
            permuted_weak["tokenizer"],
            [parity_verifier],
            **MINING,
        )


def test_mine_negatives_without_a_strong_model_checks_the_tokenizer_against_the_weak_one(tiny, permuted_weak):
    from wmss_trl.negatives import mine_negatives

    with pytest.raises(ValueError, match=REFUSED):
        mine_negatives(
            mining_prompts(),
            load(tiny["weak"]),
            None,
            permuted_weak["tokenizer"],
            [parity_verifier],
            **{**MINING, "rank_by": "weak"},
        )


def write_prompts(path):
    with open(path, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"{i}+{i}=", "answer": 2 * i}) + "\n")
    return str(path)


def mine_argv(data, weak, strong, out):
    return [
        "--dataset_name",
        data,
        "--weak_model_name_or_path",
        weak,
        "--strong_model_name_or_path",
        strong,
        "--reward_funcs",
        "wmss_trl.rewards.numeric_accuracy_reward",
        "--num_samples",
        "2",
        "--max_new_tokens",
        "3",
        "--batch_size",
        "2",
        "--keep_truncated",
        "true",
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]


def test_mine_negatives_command_compares_the_weak_tokenizer_with_the_strong_one(tiny, permuted_weak, tmp_path):
    from wmss_trl.recipes.mine_negatives import main

    out = tmp_path / "mined"
    with pytest.raises(
        ValueError,
        match=rf"\(weak tokenizer from {permuted_weak['path']}, strong tokenizer from "
        rf"{tiny['strong']}\): different token -> id maps",
    ):
        main(mine_argv(write_prompts(tmp_path / "p.jsonl"), permuted_weak["path"], tiny["strong"], out))
    assert not out.exists()


def test_mine_negatives_command_refuses_a_pickle_only_model_first(tiny, tmp_path):
    """safetensors only, checked for both models before anything loads (here: before the missing dataset)."""
    from wmss_trl.recipes.mine_negatives import main

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    load(tiny["strong"]).config.save_pretrained(str(pickled))
    torch.save({}, str(pickled / "pytorch_model.bin"))
    missing_data = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"the strong model checkpoint .*pickle weights only \(pytorch_model.bin\)"):
        main(mine_argv(missing_data, tiny["weak"], str(pickled), tmp_path / "o"))
    with pytest.raises(ValueError, match=r"the weak model checkpoint .*pickle weights only \(pytorch_model.bin\)"):
        main(mine_argv(missing_data, str(pickled), tiny["strong"], tmp_path / "o"))


@pytest.mark.parametrize("change", ["bos_token_id", "eos_token_id", "pad_token_id", "input_rows", "output_rows"])
def test_loaded_model_without_tokenizer_checked_on_config_and_embeddings(tiny, tmp_path, change):
    tok = load_tokenizer(tiny["strong"])
    weak = build_tiny_model(tok, seed=7)
    hidden = weak.config.hidden_size
    if change.endswith("_token_id"):
        setattr(weak.config, change, tok.convert_tokens_to_ids("<unk>"))
        match = rf"different {change} in the configs \(\[\d\] in the strong model, \[3\] in the weak\)"
    elif change == "input_rows":  # config.vocab_size unchanged: only the matrix tells
        weak.set_input_embeddings(torch.nn.Embedding(len(tok) + 8, hidden))
        match = f"the input embeddings have {len(tok)} rows in the strong model, {len(tok) + 8} in the weak one"
    else:
        weak.lm_head = torch.nn.Linear(hidden, len(tok) + 8, bias=False)
        match = f"the output embeddings have {len(tok)} rows in the strong model, {len(tok) + 8} in the weak one"
    weak = weak if change.endswith("_rows") else without_tokenizer(weak, tmp_path / "weak")
    with pytest.raises(
        ValueError,
        match=rf"do not share a tokenizer \(tokenizers not found\): {match}.*save that "
        "tokenizer with it",
    ):
        check_weak_compatible(load(tiny["strong"]), weak, tok)


def test_loaded_model_without_tokenizer_passes_with_one_warning(tiny, tmp_path):
    folder = tmp_path / "no_tokenizer"
    weak = without_tokenizer(build_tiny_model(tiny["tokenizer"], seed=8), folder)
    strong, tok = load(tiny["strong"]), load_tokenizer(tiny["strong"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default for a UserWarning: once per call site
        for _ in range(3):
            check_weak_compatible(strong, weak, tok)
    (w,) = tokenizer_warnings(record)
    assert w.category is UserWarning
    message = str(w.message)
    assert f"the weak model ({folder})" in message and f"the strong model ({tiny['strong']})" in message
    assert f"{str(folder)!r} has no tokenizer files" in message
    assert "weak_model_name_or_path" in message and "permuted" in message  # what to pass, and what is not checked
    # an in-memory model (no _name_or_path) is named as such
    with pytest.warns(UserWarning, match=NOT_COMPARED + r" of the weak model \(an in-memory Qwen2ForCausalLM"):
        check_weak_compatible(strong, build_tiny_model(tiny["tokenizer"], seed=8), tok)
    # and the trainers pass the loaded model on: SFT warns the same way
    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer

    with pytest.warns(UserWarning, match=NOT_COMPARED + rf" of the weak model \({folder}\)"):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path / "o"),
            train_dataset=arithmetic_prompt_completion(8),
            processing_class=tok,
            weak_model=weak,
        )


def test_same_tokenizer_passes_silently(tiny, tmp_path):
    """Compared by content, not identity: a separately built, equal tokenizer passes, and so does one that only names
    another eos token (the run's choice, e.g. TRL's `eos_token`). Another bos token is refused."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        check_weak_compatible(load(tiny["strong"]), load(tiny["weak"]), build_char_tokenizer())
        check_weak_compatible(tiny["strong"], tiny["weak"])
        other_eos = build_char_tokenizer()
        other_eos.eos_token = "<eos>"
        check_weak_compatible(
            tiny["strong"], load(save_model_and_tokenizer(load(tiny["weak"]), other_eos, str(tmp_path / "eos")))
        )
    assert tokenizer_warnings(record) == []
    other_bos = build_char_tokenizer()
    other_bos.bos_token = "<eos>"
    path = save_model_and_tokenizer(load(tiny["weak"]), other_bos, str(tmp_path / "bos"))
    with pytest.raises(ValueError, match=r"different bos_token ids \(2 in the strong tokenizer, 1 in the weak one\)"):
        check_weak_compatible(tiny["strong"], load(path))


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
@pytest.mark.parametrize("backend", ["colocate", "server"])
def test_grpo_refuses_a_permuted_weak_folder_it_does_not_load(tiny, permuted_weak, tmp_path, backend, monkeypatch):
    """With vLLM decoding the weak negatives and nothing else reading the weak model, the trainer does not load it,
    but still compares its folder's vocabulary and tokenizer with the policy's, before any engine starts."""
    from grpo_common import grpo_args, has_digit, prompt_dataset

    import wmss_trl.grpo.trainer as grpo_trainer
    from wmss_trl import WMSSGRPOTrainer

    monkeypatch.setattr(grpo_trainer, "resolve_weak_model", lambda *a, **k: pytest.fail("the weak model was loaded"))
    vllm = {"colocate": dict(weak_use_vllm=True), "server": dict(weak_vllm_server_base_url="http://127.0.0.1:9")}
    args = grpo_args(tmp_path, num_weak_generations=2, **vllm[backend])
    assert not args.weak_model_loaded
    with pytest.raises(ValueError, match=REFUSED):
        WMSSGRPOTrainer(
            tiny["strong"],
            has_digit,
            args=args,
            train_dataset=prompt_dataset(8),
            processing_class=load_tokenizer(tiny["strong"]),
            weak_model=permuted_weak["path"],
        )
