"""WMSSDPOTrainer as a drop-in for TRL's DPOTrainer, and its input checks.

With no weak model and no WMSS option, `WMSSDPOTrainer` must *be* TRL's `DPOTrainer`: the cases below follow TRL's
tests/test_dpo_trainer.py (same constructor arguments and dataset shapes: standard, conversational, implicit prompt;
loss types, a weighted multi-loss, precomputed reference log-probs, PEFT, TRL's own error messages), with the tiny
local models of conftest.py instead of hub models, and each runs TRL's class and ours on the same inputs: same
logged losses and metrics bit for bit, same trained weights. Then the refusals (a WMSS option without a weak model),
the numeric config fields, identical pairs after truncation, empty or fully truncated datasets, pickle-only
checkpoints, and the weak tokenizer check when TRL loads the processing class itself.
"""

import logging
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dpo_run import preference_pairs  # noqa: E402

from wmss_trl import WMSSDPOConfig, WMSSDPOTrainer  # noqa: E402
from wmss_trl.toy import (  # noqa: E402
    DEFAULT_CHARS,
    build_char_tokenizer,
    build_tiny_model,
    load_tokenizer,
    save_model_and_tokenizer,  # noqa: E402
)


TIMING = ("_runtime", "_per_second")


def standard_pairs(n=8):
    """TRL's "standard_preference" shape: text prompt / chosen / rejected."""
    return Dataset.from_list(
        [{"prompt": f"{i}+{i % 3}=", "chosen": str(i + i % 3), "rejected": f"{i + 7} no"} for i in range(n)]
    )


def implicit_prompt_pairs(n=8):
    """TRL's "standard_implicit_prompt_preference" shape: no prompt column, TRL extracts the shared prefix."""
    return Dataset.from_list(
        [{"chosen": f"{i}+{i % 3}={i + i % 3}", "rejected": f"{i}+{i % 3}={i + 7} no"} for i in range(n)]
    )


DATASETS = {"standard": standard_pairs, "conversational": preference_pairs, "implicit_prompt": implicit_prompt_pairs}


def both(tiny, tmp_path, dataset, model=None, trainer_kw=None, **config):
    """TRL's DPOTrainer and ours, built from the same arguments (ours with WMSSDPOConfig and no weak model)."""
    out = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (WMSSDPOTrainer, WMSSDPOConfig)):
        kw = dict(trainer_kw or {})
        if "processing_class" not in kw:
            kw["processing_class"] = load_tokenizer(tiny["strong"])
        args = cpu_args(cfg, tmp_path / cls.__name__, learning_rate=1e-2, **config)
        out.append(cls(model() if model else tiny["strong"], args=args, train_dataset=dataset, **kw))
    return out


def logged(trainer):
    return [{k: v for k, v in h.items() if not k.endswith(TIMING)} for h in trainer.state.log_history]


def assert_same_run(theirs, ours):
    theirs.train()
    ours.train()
    assert logged(ours) == logged(theirs)  # same keys, values bit for bit
    assert any("rewards/margins" in h for h in logged(ours))
    for (name, p), (name_t, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        assert name == name_t
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# -- no weak model: TRL's DPOTrainer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(DATASETS))
def test_train_dataset_shapes(tiny, tmp_path, shape, caplog):
    with caplog.at_level(logging.INFO, logger="wmss_trl.dpo"):
        theirs, ours = both(tiny, tmp_path, DATASETS[shape]())
    assert [r.getMessage() for r in caplog.records if "WMSS inactive" in r.getMessage()] == [
        "WMSS inactive: no weak model given, so this is TRL's DPOTrainer. Pass weak_model= or "
        "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
    ]
    assert ours.weak_model is None and not ours.wmss_enabled
    assert ours.ref_model is not None  # TRL's default reference: a fresh copy of the policy
    assert_same_run(theirs, ours)


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": ["sigmoid"]},
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["robust"], "label_smoothing": 0.1},
        {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
        {"loss_type": ["apo_zero"]},
        {"loss_type": ["apo_down"]},
        {"loss_type": ["nca_pair"]},
        {"loss_type": ["bco_pair"]},
        {"loss_type": ["sppo_hard"]},
        {"loss_type": ["aot"]},
        {"loss_type": ["aot_unpaired"]},
        {"loss_type": ["discopop"]},
        {"loss_type": ["sigmoid_norm"]},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # TRL's MPO case
        {"use_weighting": True},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "js_divergence"},
        {"mixing_lambda": 1.0, "beta": 0.5},  # a WMSS option at its "off" value: still TRL
    ],
    ids=lambda c: "+".join(c.get("loss_type", [])) or "-".join(f"{k}" for k in c),
)
def test_train_loss_types(tiny, tmp_path, config):
    theirs_cfg = {k: v for k, v in config.items() if k != "mixing_lambda"}
    theirs = DPOTrainer(
        tiny["strong"],
        args=cpu_args(DPOConfig, tmp_path / "t", learning_rate=1e-2, **theirs_cfg),
        train_dataset=preference_pairs(8),
        processing_class=load_tokenizer(tiny["strong"]),
    )
    ours = WMSSDPOTrainer(
        tiny["strong"],
        args=cpu_args(WMSSDPOConfig, tmp_path / "o", learning_rate=1e-2, **config),
        train_dataset=preference_pairs(8),
        processing_class=load_tokenizer(tiny["strong"]),
    )
    assert_same_run(theirs, ours)


def test_train_with_eval_and_precompute_ref_log_probs(tiny, tmp_path):
    theirs, ours = both(
        tiny,
        tmp_path,
        preference_pairs(8),
        trainer_kw={"eval_dataset": preference_pairs(4)},
        precompute_ref_log_probs=True,
        eval_strategy="steps",
        eval_steps=1,
    )
    assert ours.ref_model is None and "ref_chosen_logps" in ours.train_dataset.column_names  # TRL's precompute
    assert ours.train_dataset["ref_chosen_logps"] == theirs.train_dataset["ref_chosen_logps"]
    assert_same_run(theirs, ours)
    assert any("eval_rewards/margins" in h for h in logged(ours))


def test_train_processing_class_none(tiny, tmp_path):
    """TRL loads the processing class from the model folder itself."""
    theirs, ours = both(tiny, tmp_path, preference_pairs(8), trainer_kw={"processing_class": None})
    assert type(ours.processing_class) is type(theirs.processing_class)
    assert_same_run(theirs, ours)


def test_train_with_peft_config_is_plain_trl(tiny, tmp_path):
    """A new adapter alone (no weak model, peft_base_as_weak=False) means plain TRL: reference = adapters disabled."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs, ours = both(tiny, tmp_path, preference_pairs(8), trainer_kw={"peft_config": lora})
    assert ours.ref_model is None and not ours.wmss_enabled
    assert_same_run(theirs, ours)
    # the zero-initialised LoRA B matrices were trained, so the reference (adapters off) and the policy now differ
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in ours.model.named_parameters())


def test_train_with_peft_model_uses_trl_ref_adapter(tiny, tmp_path):
    """A PeftModel with a pretrained adapter: TRL's reference is a frozen copy of that adapter ("ref")."""
    from peft import LoraConfig, get_peft_model

    def peft_model():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny["strong"])
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    theirs, ours = both(tiny, tmp_path, preference_pairs(8), model=peft_model)
    assert "ref" in ours.model.peft_config and "ref" in theirs.model.peft_config
    assert_same_run(theirs, ours)


def test_trl_input_checks_come_first(tiny, tmp_path):
    """TRL's own messages for the inputs it validates, unchanged."""
    tok = load_tokenizer(tiny["strong"])
    for kw in ({}, {"mixing_lambda": 1.0}):
        with pytest.raises(ValueError) as theirs:
            DPOTrainer(tiny["strong"], args=cpu_args(DPOConfig, tmp_path), processing_class=tok)
        with pytest.raises(ValueError) as ours:
            WMSSDPOTrainer(tiny["strong"], args=cpu_args(WMSSDPOConfig, tmp_path, **kw), processing_class=tok)
        assert str(ours.value) == str(theirs.value) == "`train_dataset` is required"

    def gen():
        yield from preference_pairs(8)

    errors = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (WMSSDPOTrainer, WMSSDPOConfig)):
        with pytest.raises(ValueError, match="not supported with IterableDataset") as err:
            cls(
                tiny["strong"],
                args=cpu_args(cfg, tmp_path, precompute_ref_log_probs=True),
                train_dataset=IterableDataset.from_generator(gen),
                processing_class=load_tokenizer(tiny["strong"]),
            )
        errors.append(str(err.value))
    assert errors[0] == errors[1]


# -- refusals: a WMSS option without a weak model ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [{"mixing_lambda": 0.5}, {"entropy_pair_weights": True}, {"mixing_lambda": 0.5, "entropy_pair_weights": True}],
)
def test_wmss_option_without_weak_model_is_refused_before_loading(tiny, tmp_path, option):
    # the policy path does not exist: the refusal comes before anything is loaded
    with pytest.raises(ValueError, match=r"need\(s\) a weak model.*weak_model_name_or_path.*peft_base_as_weak=True"):
        WMSSDPOTrainer(
            str(tmp_path / "not-loaded"),
            args=cpu_args(WMSSDPOConfig, tmp_path, **option),
            train_dataset=preference_pairs(4),
        )


def test_peft_base_as_weak_refusals(tiny, tmp_path):
    tok = load_tokenizer(tiny["strong"])
    with pytest.raises(ValueError, match="peft_base_as_weak=True needs a PEFT policy"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, peft_base_as_weak=True),
            train_dataset=preference_pairs(4),
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="peft_base_as_weak=True and a weak model were both given"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, peft_base_as_weak=True, weak_model_name_or_path=tiny["weak"]),
            train_dataset=preference_pairs(4),
            processing_class=tok,
        )


# -- numeric config fields (checks.py), stored converted --------------------------------------------------------------


def test_numeric_fields_are_converted_and_used(tiny, tmp_path):
    args = cpu_args(
        WMSSDPOConfig,
        tmp_path / "s",
        mixing_lambda="0.5",
        mixing_chunk_size="3",
        pair_weight_alpha="0.2",
        pair_weight_beta=1,
        pair_weight_gamma="0",
        weak_model_name_or_path=tiny["weak"],
    )
    assert (args.mixing_lambda, args.mixing_chunk_size) == (0.5, 3) and type(args.mixing_lambda) is float
    assert (args.pair_weight_alpha, args.pair_weight_beta, args.pair_weight_gamma) == (0.2, 1.0, 0.0)
    tok = load_tokenizer(tiny["strong"])
    losses = []
    for lam, sub in (("0.5", "s"), (0.5, "f")):
        trainer = WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path / sub, mixing_lambda=lam, weak_model_name_or_path=tiny["weak"]),
            train_dataset=preference_pairs(8),
            processing_class=tok,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        losses.append(trainer.compute_loss(trainer.model, batch).item())  # a bare TypeError with the string before
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mixing_lambda", float("nan"), "mixing_lambda must be a finite number"),
        ("mixing_lambda", "inf", "mixing_lambda must be a finite number"),
        ("mixing_lambda", 1.5, r"mixing_lambda must be in \(0.0, 1.0\]"),
        ("mixing_lambda", "half", "mixing_lambda must be a number"),
        ("mixing_chunk_size", 0, r"mixing_chunk_size must be in \[1, inf\)"),
        ("mixing_chunk_size", 2.5, "mixing_chunk_size must be an integer"),
        ("pair_weight_alpha", -1, r"pair_weight_alpha must be in \[0.0, inf\)"),
        ("pair_weight_beta", float("nan"), "pair_weight_beta must be a finite number"),
        ("pair_weight_gamma", "x", "pair_weight_gamma must be a number"),
    ],
)
def test_numeric_fields_are_validated(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        cpu_args(WMSSDPOConfig, tmp_path, **{field: value})


# -- identical pairs: compared as the model sees them, after truncation -----------------------------------------------


def truncation_pairs(mode):
    """4 of 8 pairs differ only in tokens that truncation to max_length=12 cuts (after the 12th token with keep_start,
    before the last 12 with keep_end); the other 4 differ inside the window."""
    rows = []
    for i in range(8):
        tail = "abcdefghij"
        if mode == "keep_start":
            chosen, rejected = f"{i} {tail}x", (f"{i} {tail}y" if i % 2 else f"{i + 1} {tail}x")
        else:
            chosen, rejected = f"x{tail} {i}", (f"y{tail} {i}" if i % 2 else f"x{tail} {i + 1}")
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{i}?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return Dataset.from_list(rows)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_pairs_identical_after_truncation(tiny, tmp_path, mode, caplog):
    data, tok = truncation_pairs(mode), load_tokenizer(tiny["strong"])
    cfg = dict(max_length=12, truncation_mode=mode, weak_model_name_or_path=tiny["weak"])
    expected = (
        r"4 of 8 pairs .*0 have chosen == rejected, 4 became identical only after truncation to "
        rf"max_length=12 \(truncation_mode='{mode}'\).*raise max_length"
    )
    with pytest.raises(ValueError, match=expected):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path / "a", **cfg),
            train_dataset=data,
            processing_class=tok,
        )
    trainer = WMSSDPOTrainer(
        tiny["strong"],
        args=cpu_args(WMSSDPOConfig, tmp_path / "b", drop_identical_pairs=True, **cfg),
        train_dataset=data,
        processing_class=tok,
    )
    assert trainer.identical_pairs_dropped == {"train": 4} and len(trainer.train_dataset) == 4
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    chosen, rejected = batch["input_ids"].chunk(2)
    assert all(not torch.equal(c, r) for c, r in zip(chosen, rejected))  # what is left carries a preference
    # WMSS inactive: kept, as TRL keeps them, with a warning that says why
    with caplog.at_level(logging.WARNING, logger="wmss_trl.dpo"):
        plain = WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path / "c", max_length=12, truncation_mode=mode),
            train_dataset=data,
            processing_class=tok,
        )
    assert len(plain.train_dataset) == 8 and plain.identical_pairs_dropped == {"train": 0}
    assert any(
        "4 became identical only after truncation" in r.getMessage() and "kept, as TRL does" in r.getMessage()
        for r in caplog.records
    )


# -- empty and fully truncated datasets ----------------------------------------------------------------------------


def test_empty_dataset_says_so(tiny, tmp_path):
    tok, empty = load_tokenizer(tiny["strong"]), preference_pairs(4).select([])
    for weak in ({"weak_model_name_or_path": tiny["weak"]}, {}):
        with pytest.raises(ValueError, match="the train dataset is empty"):  # TRL: a bare StopIteration
            WMSSDPOTrainer(
                tiny["strong"],
                args=cpu_args(WMSSDPOConfig, tmp_path, **weak),
                train_dataset=empty,
                processing_class=tok,
            )
    with pytest.raises(ValueError, match="the eval dataset is empty"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path),
            train_dataset=preference_pairs(4),
            eval_dataset=empty,
            processing_class=tok,
        )


def test_prompts_longer_than_max_length(tiny, tmp_path, caplog):
    tok = load_tokenizer(tiny["strong"])
    long = Dataset.from_list([{"prompt": "1+1=" * 10, "chosen": "2", "rejected": "3"}] * 4)
    with pytest.raises(
        ValueError,
        match=r"4 of 4 examples were dropped because their prompt alone has at least "
        r"max_length=8 tokens.*nothing is left.*raise max_length.*keep_end",
    ):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, max_length=8, weak_model_name_or_path=tiny["weak"]),
            train_dataset=long,
            processing_class=tok,
        )
    mixed = Dataset.from_list(long.to_list()[:1] + standard_pairs(3).to_list())
    with caplog.at_level(logging.WARNING, logger="wmss_trl.dpo"):
        trainer = WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, max_length=8),
            train_dataset=mixed,
            processing_class=tok,
        )
    assert len(trainer.train_dataset) == 3
    assert any("1 of 4 examples were dropped" in r.getMessage() for r in caplog.records)


# -- checkpoints and tokenizers ------------------------------------------------------------------------------------


def test_pickle_only_policy_is_refused_before_loading(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    (tmp_path / "pickle").mkdir()
    model.config.save_pretrained(str(tmp_path / "pickle"))
    torch.save(model.state_dict(), str(tmp_path / "pickle" / "pytorch_model.bin"))  # what transformers would load
    with pytest.raises(ValueError, match="policy checkpoint .* has pickle weights only"):
        WMSSDPOTrainer(
            str(tmp_path / "pickle"),
            args=cpu_args(WMSSDPOConfig, tmp_path),
            train_dataset=preference_pairs(4),
            processing_class=load_tokenizer(tiny["strong"]),
        )


@pytest.fixture(scope="module")
def permuted_weak(tiny, tmp_path_factory):
    """A weak model saved with a permuted character tokenizer: same size as the strong one, other token -> id map."""
    chars = list(DEFAULT_CHARS)
    random.Random(0).shuffle(chars)
    tok = build_char_tokenizer("".join(chars))
    assert len(tok) == len(tiny["tokenizer"]) and tok.get_vocab() != tiny["tokenizer"].get_vocab()
    return save_model_and_tokenizer(build_tiny_model(tok, seed=2), tok, str(tmp_path_factory.mktemp("permuted")))


@pytest.mark.parametrize("given_as", ["path", "model"])
@pytest.mark.parametrize("precompute", [False, True])
def test_permuted_vocabulary_refused_when_trl_loads_the_tokenizer(tiny, tmp_path, permuted_weak, given_as, precompute):
    """processing_class=None (TRL loads the strong tokenizer itself): a weak model whose tokenizer maps the same number
    of tokens to other ids is refused, whether it comes as a folder or as a loaded model (the loaded case relies on
    weak.check_weak_compatible comparing the real tokenizers of loaded models)."""
    weak = permuted_weak if given_as == "path" else AutoModelForCausalLM.from_pretrained(permuted_weak)
    calls = []
    if given_as == "model":
        weak.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="tokenizer"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, precompute_ref_log_probs=precompute),
            train_dataset=preference_pairs(4),
            weak_model=weak,
        )
    assert calls == []  # refused before the weak model ran (TRL's precompute is a weak forward)


@pytest.mark.parametrize("precompute", [False, True])
def test_weak_checked_before_its_first_forward(tiny, tmp_path, precompute):
    """processing_class=None defers the weak check until TRL has its processing class; it still runs before the first
    weak forward (TRL's precompute of the reference log-probs runs inside the constructor)."""
    other_tok = build_char_tokenizer("0123456789+=")
    weak = build_tiny_model(other_tok, seed=3)
    calls = []
    weak.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="different vocabularies"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, precompute_ref_log_probs=precompute),
            train_dataset=preference_pairs(4),
            weak_model=weak,
        )
    assert calls == []


@pytest.mark.parametrize("option", [dict(mixing_lambda=0.5), dict(entropy_pair_weights=True)])
def test_prompt_learning_refused_with_mixing_or_pair_weights(tiny, tmp_path, option):
    from peft import PromptTuningConfig, TaskType

    args = cpu_args(WMSSDPOConfig, tmp_path, weak_model_name_or_path=tiny["weak"], **option)
    with pytest.raises(ValueError, match=r"PromptTuningConfig \(prompt learning\) is not supported"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=args,
            train_dataset=preference_pairs(8),
            processing_class=tiny["tokenizer"],
            peft_config=PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
        )
