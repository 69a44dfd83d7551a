"""Drop-in: WMSSSFTTrainer without a weak model, or with mixing_lambda=1, is TRL's SFTTrainer.

The cases follow TRL's own tests/test_sft_trainer.py (same constructor arguments and dataset shapes), with local tiny
models and local datasets instead of hub ones. Each case trains TRL's SFTTrainer and WMSSSFTTrainer (no weak model;
a weak model with mixing_lambda=1) from the same seed and compares the whole log history: same metric names, same
values, bit for bit. Then: what mixing_lambda < 1 refuses at construction, the TRL metrics it keeps, and the
config / dataset errors.
"""

import logging

import pytest
import torch
from conftest import arithmetic_prompt_completion, cpu_args
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from trl import SFTConfig, SFTTrainer

from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer
from wmss_trl.toy import save_model_and_tokenizer


TIMING = ("_runtime", "_per_second")  # wall-clock fields of the log history

QA = [
    ("Does llamas know how to code?", "Yes, llamas are very good at coding."),
    ("Does llamas know how to fly?", "No, llamas can't fly."),
    ("Does llamas know how to talk?", "Yes, llamas are very good at talking."),
    ("Does llamas know how to swim?", "No, llamas can't swim."),
    ("Does llamas know how to cook?", "No, llamas can't cook."),
    ("Does llamas know how to sing?", "Yes, llamas are very good at singing."),
]


def standard_lm(n=8):
    return Dataset.from_list([{"text": f"### Question: {q}\n ### Answer: {a}"} for q, a in (QA * 2)[:n]])


def conversational_lm(n=8):
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in (QA * 2)[:n]]
    )


def cross_entropy_loss(outputs, labels, num_items_in_batch=None):
    """A user `compute_loss_func` (as in transformers' docs): summed next-token CE / number of trained tokens."""
    logits = outputs.logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


@pytest.fixture(scope="module")
def moe(tiny):
    """A tiny Qwen2-MoE strong/weak pair (router load-balancing loss on: router_aux_loss_coef=0.01)."""
    tok = tiny["tokenizer"]
    paths = {}
    for name, seed in (("strong", 1), ("weak", 2)):
        config = Qwen2MoeConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.01,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        torch.manual_seed(seed)
        paths[name] = save_model_and_tokenizer(Qwen2MoeForCausalLM(config), tok, str(tiny["root"] / f"moe_{name}"))
    return paths


def history(trainer):
    return [{k: v for k, v in h.items() if not k.endswith(TIMING)} for h in trainer.state.log_history]


def train_three(tiny, tmp_path, model, dataset, config=None, trainer_kwargs=None, weak=None):
    """Train TRL's SFTTrainer, WMSSSFTTrainer without a weak model, and WMSSSFTTrainer with a weak model at
    mixing_lambda=1, on the same data from the same seed. Returns the three trainers."""
    config, trainer_kwargs = dict(config or {}), dict(trainer_kwargs or {})
    trainers = []
    for name, cls, extra in (
        ("trl", SFTConfig, {}),
        ("none", WMSSSFTConfig, {}),
        ("lam1", WMSSSFTConfig, {"weak_model_name_or_path": weak or tiny["weak"], "mixing_lambda": 1.0}),
    ):
        args = cpu_args(cls, tmp_path / name, **config, **extra)
        trainer_cls = SFTTrainer if cls is SFTConfig else WMSSSFTTrainer
        kwargs = {k: (v() if callable(v) and k == "peft_config" else v) for k, v in trainer_kwargs.items()}
        trainer = trainer_cls(model, args=args, train_dataset=dataset, processing_class=tiny["tokenizer"], **kwargs)
        trainer.train()
        trainers.append(trainer)
    return trainers


def assert_same_run(trainers, expected_metrics=("loss", "entropy", "mean_token_accuracy", "num_tokens")):
    trl, *ours = trainers
    reference = history(trl)
    logged = {k for h in reference for k in h}
    assert set(expected_metrics) <= logged, logged
    for trainer in ours:
        assert history(trainer) == reference  # same names, same values, bit for bit
        assert trainer.weak_model is None  # never loaded: not needed for TRL's loss
    for p, *qs in zip(trl.model.parameters(), *(t.model.parameters() for t in ours)):
        for q in qs:
            assert torch.equal(p, q)


# ---- drop-in: the cases of TRL's test_sft_trainer.py ------------------------------------------------------------


def test_train_standard_language_modeling(tiny, tmp_path):
    """TRL: test_train (standard language modeling, model given as a path)."""
    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], standard_lm()))


def test_train_model_instance_and_sft_config(tiny, tmp_path):
    """TRL: test_train_model; also the swap of the class alone: WMSSSFTTrainer accepts a plain SFTConfig."""
    dataset = standard_lm()
    trl = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny["strong"]),
        args=cpu_args(SFTConfig, tmp_path / "a"),
        train_dataset=dataset,
        processing_class=tiny["tokenizer"],
    )
    ours = WMSSSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny["strong"]),
        args=cpu_args(SFTConfig, tmp_path / "b"),
        train_dataset=dataset,
        processing_class=tiny["tokenizer"],
    )
    assert isinstance(ours.args, WMSSSFTConfig) and ours.args.eos_token == trl.args.eos_token
    trl.train()
    ours.train()
    assert history(ours) == history(trl)


def test_train_assistant_only(tiny, tmp_path):
    """TRL: test_train_assistant_only (conversational language modeling)."""
    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], conversational_lm(), {"assistant_only_loss": True}))


def test_train_completion_only(tiny, tmp_path):
    """TRL: test_train_completion_only (conversational prompt-completion)."""
    config = {"completion_only_loss": True}
    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], arithmetic_prompt_completion(8), config))


def test_train_dft_loss(tiny, tmp_path):
    """loss_type='dft' is TRL's DFT loss (the old code trained its own NLL here)."""
    trainers = train_three(tiny, tmp_path, tiny["strong"], standard_lm(), {"loss_type": "dft"})
    assert_same_run(trainers)
    nll = train_three(tiny, tmp_path / "nll", tiny["strong"], standard_lm())[0]
    assert history(trainers[0])[0]["loss"] < 0.5 * history(nll)[0]["loss"]  # DFT really is another loss


def test_train_compute_loss_func(tiny, tmp_path):
    """A user `compute_loss_func` is used, as by TRL."""
    trainers = train_three(
        tiny, tmp_path, tiny["strong"], standard_lm(), trainer_kwargs={"compute_loss_func": cross_entropy_loss}
    )
    assert_same_run(trainers)


def test_train_label_smoothing(tiny, tmp_path):
    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], standard_lm(), {"label_smoothing_factor": 0.1}))


def test_train_dense_with_peft_config_is_plain_trl(tiny, tmp_path):
    """TRL: test_train_dense_with_peft_config. A peft_config alone (peft_base_as_weak=False) is plain TRL SFT: the old
    code silently mixed with the adapter-disabled base at lambda 0.5."""
    from peft import LoraConfig

    def lora():
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )

    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], standard_lm(), trainer_kwargs={"peft_config": lora}))


def test_prompt_tuning(tiny, tmp_path):
    """TRL: test_prompt_tuning (PEFT prompt learning; the old code crashed: the backbone was called directly)."""
    from peft import PromptEncoderConfig, TaskType

    def prompt_encoder():
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8)

    trainers = train_three(
        tiny, tmp_path, tiny["strong"], standard_lm(), trainer_kwargs={"peft_config": prompt_encoder}
    )
    assert_same_run(trainers)
    assert history(trainers[1])[-1]["train_loss"] is not None


def test_train_moe_with_aux_loss(tiny, moe, tmp_path):
    """TRL: test_train with an MoE model: the router load-balancing loss is added and logged (`aux_loss`)."""
    trainers = train_three(tiny, tmp_path, moe["strong"], standard_lm(), weak=moe["weak"])
    assert_same_run(trainers, expected_metrics=("loss", "aux_loss", "entropy", "mean_token_accuracy"))


def test_train_padding_free(tiny, tmp_path):
    """TRL: test_train_padding_free (max_length=None, as TRL requires without packing)."""
    assert_same_run(
        train_three(tiny, tmp_path, tiny["strong"], standard_lm(), {"padding_free": True, "max_length": None})
    )


def test_train_packing_bfd(tiny, tmp_path):
    """TRL: test_train_packing with the 'bfd' strategy (padding-free batches: `num_tokens` from position_ids)."""
    config = {"packing": True, "packing_strategy": "bfd", "max_length": 40}
    assert_same_run(train_three(tiny, tmp_path, tiny["strong"], standard_lm(), config))


def test_train_with_eval_and_best_model_on_token_accuracy(tiny, tmp_path):
    """TRL: test_train_with_eval, plus metric_for_best_model='eval_mean_token_accuracy' (old code: KeyError)."""
    config = dict(
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
        metric_for_best_model="eval_mean_token_accuracy",
        load_best_model_at_end=True,
    )
    trainers = train_three(tiny, tmp_path, tiny["strong"], standard_lm(), config, {"eval_dataset": standard_lm(4)})
    assert_same_run(trainers, expected_metrics=("loss", "eval_loss", "eval_mean_token_accuracy", "eval_entropy"))
    assert trainers[1].state.best_metric == trainers[0].state.best_metric is not None


def test_one_info_line_per_mode(tiny, tmp_path, caplog):
    dataset = standard_lm(4)
    cases = [
        ({}, "WMSS inactive: no weak model given, so this is TRL's SFTTrainer"),
        ({"weak_model_name_or_path": tiny["weak"], "mixing_lambda": 1.0}, "the weak model is neither loaded nor run"),
        ({"weak_model_name_or_path": tiny["weak"], "mixing_lambda": 0.5}, "WMSS WD-JT active"),
    ]
    for i, (extra, expected) in enumerate(cases):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wmss_trl.sft"):
            WMSSSFTTrainer(
                tiny["strong"],
                args=cpu_args(WMSSSFTConfig, tmp_path / str(i), **extra),
                train_dataset=dataset,
                processing_class=tiny["tokenizer"],
            )
        lines = [r.getMessage() for r in caplog.records if r.name == "wmss_trl.sft"]
        assert len(lines) == 1 and expected in lines[0], lines


# ---- mixing_lambda < 1: TRL's metrics kept, unsupported set-ups refused at construction ------------------------


def naive_strong_metrics(model, batch):
    """Independent: full logits of the strong model; entropy and top-1 accuracy over the trained next tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].mean().item()
    accuracy = (logits.argmax(-1) == labels)[mask].double().mean().item()
    return entropy, accuracy, int(batch["attention_mask"].sum())


@pytest.mark.parametrize("fused", [True, False])
def test_mixing_logs_trl_metrics_of_the_strong_model(tiny, tmp_path, fused):
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(WMSSSFTConfig, tmp_path, weak_model_name_or_path=tiny["weak"], mixing_lambda=0.4),
        train_dataset=arithmetic_prompt_completion(8),
        processing_class=tiny["tokenizer"],
    )
    trainer._fused_head = fused
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    metrics = trainer._metrics["train"]
    entropy, accuracy, tokens = naive_strong_metrics(trainer.model, batch)
    assert metrics["entropy"] == [pytest.approx(entropy, rel=1e-5)]
    assert metrics["mean_token_accuracy"] == [pytest.approx(accuracy, abs=1e-7)]
    assert metrics["num_tokens"] == [tokens]
    assert metrics["wmss/strong_entropy"] == metrics["entropy"]


@pytest.mark.parametrize(
    "layout",
    [
        {"padding_free": True, "max_length": None},
        {"packing": True, "packing_strategy": "bfd", "max_length": 40, "gradient_accumulation_steps": 2},
    ],
    ids=["padding_free", "bfd_packing_accumulation"],
)
def test_mixing_eval_best_model_on_token_accuracy(tiny, tmp_path, layout):
    """WD-JT with padding-free / packed batches, eval, and metric_for_best_model='eval_mean_token_accuracy'."""
    args = cpu_args(
        WMSSSFTConfig,
        tmp_path,
        weak_model_name_or_path=tiny["weak"],
        mixing_lambda=0.5,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="eval_mean_token_accuracy",
        load_best_model_at_end=True,
        **layout,
    )
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=standard_lm(),
        eval_dataset=standard_lm(4),
        processing_class=tiny["tokenizer"],
    )
    assert "position_ids" in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    logs = trainer.state.log_history
    assert trainer.state.best_metric is not None
    assert all(0 <= h["eval_mean_token_accuracy"] <= 1 for h in logs if "eval_loss" in h)
    train_logs = [h for h in logs if "loss" in h]
    assert len(train_logs) == 2 and all("wmss/mixed_loss" in h and "entropy" in h for h in train_logs)
    assert 0 < train_logs[0]["num_tokens"] < train_logs[1]["num_tokens"]
    if "padding_free" in layout:  # 2 steps of 4 rows: the 8 rows once, counted from the packed rows as TRL counts
        assert train_logs[1]["num_tokens"] == sum(len(ids) for ids in trainer.train_dataset["input_ids"])


def test_mixing_with_moe_without_aux_loss(tiny, moe, tmp_path):
    """An MoE model trains under WD-JT once its load-balancing loss is off (router_aux_loss_coef=0.0)."""
    args = cpu_args(
        WMSSSFTConfig, tmp_path, weak_model_name_or_path=moe["weak"], mixing_lambda=0.5, router_aux_loss_coef=0.0
    )
    trainer = WMSSSFTTrainer(moe["strong"], args=args, train_dataset=standard_lm(), processing_class=tiny["tokenizer"])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "wmss/mixed_loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert not any("aux_loss" in h for h in logged)


REFUSALS = [
    (
        {"loss_type": "dft"},
        {},
        r"loss_type='dft' is not supported with mixing_lambda=0.5 < 1.*only supported loss_type is 'nll'",
    ),
    ({}, {"compute_loss_func": cross_entropy_loss}, r"compute_loss_func is not supported with mixing_lambda=0.5"),
    ({"label_smoothing_factor": 0.1}, {}, r"label_smoothing_factor=0.1 is not supported"),
    ({"use_liger_kernel": True}, {}, r"use_liger_kernel=True is not supported"),
    ({}, {"peft_config": "prompt"}, r"PromptEncoderConfig \(prompt learning\) is not supported.*LoraConfig"),
    ({}, {"peft_config": "prefix"}, r"PrefixTuningConfig \(prompt learning\) is not supported"),
]


@pytest.mark.parametrize("config,trainer_kwargs,message", REFUSALS)
def test_mixing_refuses_unsupported_before_loading(tiny, tmp_path, config, trainer_kwargs, message):
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType

    peft = {
        "prompt": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
    }
    trainer_kwargs = {k: peft.get(v, v) if k == "peft_config" else v for k, v in trainer_kwargs.items()}
    policy = weightless_copy(tiny["strong"], tmp_path / "policy")
    args = cpu_args(WMSSSFTConfig, tmp_path / "out", weak_model_name_or_path=tiny["weak"], mixing_lambda=0.5, **config)
    with pytest.raises(ValueError, match=message):
        WMSSSFTTrainer(
            policy, args=args, train_dataset=standard_lm(), processing_class=tiny["tokenizer"], **trainer_kwargs
        )
    # ...and the same settings are accepted at mixing_lambda=1 (TRL's loss; liger is not installed here)
    if "peft_config" not in trainer_kwargs and "use_liger_kernel" not in config:
        args = cpu_args(
            WMSSSFTConfig, tmp_path / "ok", weak_model_name_or_path=tiny["weak"], mixing_lambda=1.0, **config
        )
        WMSSSFTTrainer(
            tiny["strong"],
            args=args,
            train_dataset=standard_lm(),
            processing_class=tiny["tokenizer"],
            **trainer_kwargs,
        )


def weightless_copy(path, dest):
    import shutil

    shutil.copytree(path, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(dest)


def test_mixing_with_moe_adds_the_router_aux_loss(tiny, moe, tmp_path):
    """WD-JT on an MoE model: loss = mixed CE + router_aux_loss_coef * load-balancing loss, as SFTTrainer adds it;
    checked against the model's own forward (HF's aux_loss) and a naive fp64 mixed CE; `aux_loss` is logged. The
    fused head computes no router loss, so an MoE model takes the logits path (the model's own aux_loss: each MoE
    family computes it its own way)."""
    lam = 0.4
    args = cpu_args(WMSSSFTConfig, tmp_path, weak_model_name_or_path=moe["weak"], mixing_lambda=lam)
    trainer = WMSSSFTTrainer(moe["strong"], args=args, train_dataset=standard_lm(), processing_class=tiny["tokenizer"])
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01 and not trainer._fused_head
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    gate = [p.grad for n, p in trainer.model.named_parameters() if "mlp.gate.weight" in n]
    assert gate and all(g is not None and g.abs().sum() > 0 for g in gate)

    weak = AutoModelForCausalLM.from_pretrained(moe["weak"])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        own = trainer.model(input_ids=ids, attention_mask=attention, output_router_logits=True)
        zw = weak(input_ids=ids, attention_mask=attention).logits.double()
    z = lam * own.logits.double()[:, :-1] + (1 - lam) * zw[:, :-1]
    mixed = torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert 0.01 * own.aux_loss.item() > 1e-3 * loss.item()  # large enough for the next check to see it
    assert loss.item() == pytest.approx(mixed.item() + 0.01 * own.aux_loss.item(), rel=1e-5)
    assert trainer._metrics["train"]["aux_loss"] == [pytest.approx(own.aux_loss.item(), rel=1e-5)]


def test_mixing_refuses_prompt_tuning_peft_model_with_peft_base_as_weak(tiny, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["strong"]),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    )
    args = cpu_args(WMSSSFTConfig, tmp_path, peft_base_as_weak=True, mixing_lambda=0.5)
    with pytest.raises(ValueError, match=r"PromptTuningConfig \(prompt learning\) is not supported"):
        WMSSSFTTrainer(model, args=args, train_dataset=standard_lm(), processing_class=tiny["tokenizer"])


def test_peft_base_as_weak_needs_a_peft_policy_and_no_weak_model(tiny, tmp_path):
    from peft import LoraConfig

    policy = weightless_copy(tiny["strong"], tmp_path / "policy")
    with pytest.raises(ValueError, match=r"peft_base_as_weak=True needs a PEFT policy"):
        WMSSSFTTrainer(
            policy,
            args=cpu_args(WMSSSFTConfig, tmp_path / "a", peft_base_as_weak=True),
            train_dataset=standard_lm(),
            processing_class=tiny["tokenizer"],
        )
    args = cpu_args(WMSSSFTConfig, tmp_path / "b", peft_base_as_weak=True, weak_model_name_or_path=tiny["weak"])
    with pytest.raises(ValueError, match=r"peft_base_as_weak=True and a weak model are both given"):
        WMSSSFTTrainer(
            policy,
            args=args,
            train_dataset=standard_lm(),
            processing_class=tiny["tokenizer"],
            peft_config=LoraConfig(r=2),
        )


# ---- config values (items 6, 7) -----------------------------------------------------------------------------------


def test_string_values_are_stored_converted(tmp_path):
    args = cpu_args(
        WMSSSFTConfig,
        tmp_path,
        mixing_lambda="0.5",
        mixing_chunk_size="64",
        selection_alpha="0.2",
        selection_multiplier="2",
        selection_fraction="0.25",
        selection_seed="7",
    )
    assert type(args.mixing_lambda) is float and args.mixing_lambda == 0.5
    assert type(args.mixing_chunk_size) is int and args.mixing_chunk_size == 64
    assert type(args.selection_alpha) is float and args.selection_alpha == 0.2
    assert type(args.selection_multiplier) is float and args.selection_multiplier == 2.0
    assert type(args.selection_fraction) is float and args.selection_fraction == 0.25
    assert type(args.selection_seed) is int and args.selection_seed == 7


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("mixing_lambda", "abc", r"mixing_lambda must be a number, got 'abc'"),
        ("mixing_lambda", float("nan"), r"mixing_lambda must be a finite number"),
        ("mixing_lambda", 0.0, r"mixing_lambda must be in \(0.0, 1.0\]"),
        ("mixing_chunk_size", 0, r"mixing_chunk_size must be in \[1, inf\)"),
        ("mixing_chunk_size", "abc", r"mixing_chunk_size must be an integer"),
        ("mixing_chunk_size", 2.5, r"mixing_chunk_size must be an integer"),
        ("selection_alpha", -1.0, r"selection_alpha must be in \[0.0, inf\)"),
        ("selection_beta", float("nan"), r"selection_beta must be a finite number"),
        ("selection_gamma", float("inf"), r"selection_gamma must be a finite number"),
        ("selection_multiplier", 0.0, r"selection_multiplier must be in \(0.0, inf\)"),
        ("selection_multiplier", float("inf"), r"selection_multiplier must be a finite number"),
        ("selection_fraction", 1.5, r"selection_fraction must be in \(0.0, 1.0\]"),
        ("selection_seed", -1, r"selection_seed must be in \[0, inf\)"),
        ("selection_seed", 1.5, r"selection_seed must be an integer"),
    ],
)
def test_numeric_fields_are_validated(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        cpu_args(WMSSSFTConfig, tmp_path, **{field: value})


def test_selection_shares_need_a_positive_sum(tmp_path):
    with pytest.raises(
        ValueError, match=r"at least one of selection_alpha, selection_beta, selection_gamma must be > 0"
    ):
        cpu_args(
            WMSSSFTConfig,
            tmp_path,
            selection_mode="resample",
            entropy_files=["x.jsonl"],
            selection_alpha=0,
            selection_beta=0,
            selection_gamma=0,
        )


# ---- datasets and checkpoints (items 9, 10) ------------------------------------------------------------------------


@pytest.mark.parametrize("weak", [False, True])
@pytest.mark.parametrize("iterable", [False, True])
def test_empty_training_dataset_is_refused_before_loading(tiny, tmp_path, weak, iterable):
    empty = Dataset.from_dict({"text": []})
    if iterable:
        empty = IterableDataset.from_generator(lambda: iter(()))
    policy = weightless_copy(tiny["strong"], tmp_path / "policy")
    extra = {"weak_model_name_or_path": tiny["weak"]} if weak else {}
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\), so there is nothing to train on"):
        WMSSSFTTrainer(
            policy,
            args=cpu_args(WMSSSFTConfig, tmp_path / "o", max_steps=1, **extra),
            train_dataset=empty,
            processing_class=tiny["tokenizer"],
        )


@pytest.mark.parametrize("weak", [False, True])
def test_truncation_that_removes_every_completion_says_so(tiny, tmp_path, weak):
    dataset = arithmetic_prompt_completion(8)
    tok = tiny["tokenizer"]
    # independent: the prompt's tokens, as the chat template renders it with the assistant header
    lengths = [
        len(
            tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for row in dataset
    ]
    assert min(lengths) > 3
    extra = {"weak_model_name_or_path": tiny["weak"]} if weak else {}
    args = cpu_args(WMSSSFTConfig, tmp_path, max_length=3, **extra)
    expected = (
        rf"truncation removed every trainable token: with max_length=3 \(truncation_mode='keep_start'\) none of the 8 "
        rf"training rows.*are {min(lengths)} to {max(lengths)} tokens long. Set max_length above {max(lengths)}"
    )
    with pytest.raises(ValueError, match=expected):
        WMSSSFTTrainer(tiny["strong"], args=args, train_dataset=dataset, processing_class=tok)


def test_pickle_only_policy_is_refused(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    folder = weightless_copy(tiny["strong"], tmp_path / "pickled")
    torch.save(model.state_dict(), f"{folder}/pytorch_model.bin")
    with pytest.raises(ValueError, match=r"the policy checkpoint .* has pickle weights only \(pytorch_model.bin\)"):
        WMSSSFTTrainer(
            folder,
            args=cpu_args(WMSSSFTConfig, tmp_path / "o"),
            train_dataset=standard_lm(),
            processing_class=tiny["tokenizer"],
        )
