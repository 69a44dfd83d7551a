"""What a run leaves behind (issue 15, items 5 and 6).

* Every training command (`wmss sft|dpo|grpo`) writes the same outputs: the model (model.safetensors, config,
  tokenizer), trainer_state.json and TRL's model card README.md, which names the base model, the weak model, the
  WMSS settings and the paper; with WMSS inactive the card is TRL's own plus one line.
* A Python SFT run's card (written with each checkpoint) names the local base model instead of "[None]".
* WMSS-GRPO logs the KL to the weak reference as `wmss/kl_weak_ref`; TRL's `kl` keeps TRL's meaning.
"""

import difflib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_prompt_completion, cpu_args
from transformers import AutoModelForCausalLM, AutoTokenizer


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from dpo_run import preference_pairs  # noqa: E402
from grpo_common import grpo_args, prompt_dataset  # noqa: E402

from wmss_trl.toy import load_tokenizer  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
PAPER_ID = "2602.08222"


def write_data(command, path):
    if command == "sft":
        dataset = arithmetic_prompt_completion(8)
    elif command == "dpo":
        dataset = preference_pairs(8)
    else:
        dataset = prompt_dataset(8).add_column("answer", [str(i) for i in range(8)])
    dataset.to_json(str(path))
    return str(path)


COMMAND_OPTIONS = {
    "sft": ["--mixing_lambda", "0.4"],
    "dpo": ["--mixing_lambda", "0.6"],
    "grpo": [
        "--reward_funcs",
        "tests.dist.grpo_common.digit_fraction",
        "--num_generations",
        "4",
        "--max_completion_length",
        "8",
        "--beta",
        "0.04",
        "--num_weak_generations",
        "2",
    ],
}
SETTING = {
    "sft": "- `mixing_lambda`: `0.4`",
    "dpo": "- `mixing_lambda`: `0.6`",
    "grpo": "- `num_weak_generations`: `2`",
}


def run_command(command, tiny, tmp_path, weak=True, extra=()):
    out = tmp_path / f"{command}-out"
    argv = [
        "--model_name_or_path",
        tiny["strong"],
        "--dataset_name",
        write_data(command, tmp_path / "data.jsonl"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--bf16",
        "false",
        "--activation_checkpointing",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        *(["--weak_model_name_or_path", tiny["weak"]] if weak else []),
        *extra,
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)  # dotted reward paths are imported from the current directory
    try:
        assert importlib.import_module(f"wmss_trl.recipes.{command}").main(argv) == 0
    finally:
        os.chdir(cwd)
    return out


def assert_same_outputs(out):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "README.md"):
        assert (out / name).is_file(), f"{name} missing from {out}: {sorted(os.listdir(out))}"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("loss" in h for h in state["log_history"])
    AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    return (out / "README.md").read_text()


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
def test_every_command_writes_model_state_and_card(tiny, tmp_path, command):
    card = assert_same_outputs(run_command(command, tiny, tmp_path, extra=COMMAND_OPTIONS[command]))
    name = {"sft": "WMSS-SFT", "dpo": "WMSS-DPO", "grpo": "WMSS-GRPO"}[command]
    assert f"This model was trained with {name}, a method introduced in" in card and PAPER_ID in card
    assert f"fine-tuned version of `{tiny['strong']}` (local folder)" in card and "[None]" not in card
    assert f"- Base (strong) model: `{tiny['strong']}`" in card
    assert f"- Weak model: `{tiny['weak']}`" in card
    assert SETTING[command] in card
    assert "- wmss\n" in card  # the tag, in the card's metadata


def trl_card_of(trainer_cls, config_cls, tiny, tmp_path, dataset, model_name):
    """The card TRL's own trainer writes for the same run."""
    args = cpu_args(config_cls, tmp_path / "trl-card")
    trainer = trainer_cls(
        tiny["strong"], args=args, train_dataset=dataset, processing_class=load_tokenizer(tiny["strong"])
    )
    trainer.create_model_card(model_name=model_name)
    return (tmp_path / "trl-card" / "README.md").read_text()


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_wmss_inactive_card_is_trls_plus_one_line(tiny, tmp_path, command):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    out = run_command(command, tiny, tmp_path, weak=False)
    card = assert_same_outputs(out)
    trainer_cls, config_cls, dataset = {
        "sft": (SFTTrainer, SFTConfig, arithmetic_prompt_completion(8)),
        "dpo": (DPOTrainer, DPOConfig, preference_pairs(8)),
    }[command]
    trl_card = trl_card_of(trainer_cls, config_cls, tiny, tmp_path, dataset, out.name)
    changes = [line for line in difflib.ndiff(trl_card.splitlines(), card.splitlines()) if line[:2] in ("+ ", "- ")]
    assert sorted(changes) == [  # nothing removed or changed: one line (and a blank line) added
        "+ ",
        f"+ WMSS was inactive in this run (no weak model given): it was trained by TRL's {trainer_cls.__name__}, "
        "unchanged, through wmss_trl.",
    ]
    assert "wmss" not in card.split("---")[1]  # TRL's metadata and tags


def test_python_sft_card_names_base_and_weak_model(tiny, tmp_path):
    """The card a Python run writes with its checkpoints (TRL's `_save_checkpoint`) names the local base model."""
    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer

    args = cpu_args(
        WMSSSFTConfig,
        tmp_path / "run",
        weak_model_name_or_path=tiny["weak"],
        mixing_lambda=0.45,
        save_strategy="steps",
        save_steps=2,
    )
    WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=arithmetic_prompt_completion(8),
        processing_class=load_tokenizer(tiny["strong"]),
    ).train()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "[None]" not in card and f"fine-tuned version of `{tiny['strong']}`" in card
    assert f"- Weak model: `{tiny['weak']}`" in card and "- `mixing_lambda`: `0.45`" in card
    assert f"https://huggingface.co/papers/{PAPER_ID}" in card and "trained with WMSS-SFT" in card
    assert card.count("### WMSS (Weak-Driven Learning)") == 1


def test_card_section_is_written_once(tiny, tmp_path):
    """`trainer.create_model_card()` (TRL's, not overridden) names the WMSS run through TRL's card attributes;
    `write_card_section` adds the WMSS section once, however often it is called."""
    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer
    from wmss_trl.card import write_card_section

    args = cpu_args(WMSSSFTConfig, tmp_path / "run", weak_model_name_or_path=tiny["weak"], mixing_lambda=0.5)
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=arithmetic_prompt_completion(8),
        processing_class=load_tokenizer(tiny["strong"]),
    )
    trainer.create_model_card(model_name="run")
    trl_card = (tmp_path / "run" / "README.md").read_text()
    assert "trained with WMSS-SFT" in trl_card and "### WMSS" not in trl_card and "- wmss\n" in trl_card
    write_card_section(trainer)
    once = (tmp_path / "run" / "README.md").read_text()
    write_card_section(trainer)
    assert (tmp_path / "run" / "README.md").read_text() == once
    assert once.count("### WMSS (Weak-Driven Learning)") == 1 and "- `mixing_lambda`: `0.5`" in once


def test_grpo_kl_names(tiny, tmp_path):
    """TRL's `kl` is the KL to a copy of the initial policy; with the weak model as reference the KL term is logged
    as `wmss/kl_weak_ref` (the same value TRL's loss computed: k3 of the policy against the weak model)."""
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOConfig, WMSSGRPOTrainer
    from wmss_trl.rewards import get_numeric_accuracy_reward

    def train(cls, config_class, name, **kw):
        args = grpo_args(tmp_path / name, config_class=config_class, beta=0.04, max_steps=2, **kw)
        trainer = cls(
            tiny["strong"],
            get_numeric_accuracy_reward("answer"),
            args=args,
            train_dataset=prompt_dataset(8).add_column("answer", [str(i) for i in range(8)]),
            processing_class=load_tokenizer(tiny["strong"]),
        )
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    runs = {
        "vanilla": train(GRPOTrainer, GRPOConfig, "vanilla"),
        "inactive": train(WMSSGRPOTrainer, WMSSGRPOConfig, "inactive"),
        "wmss": train(WMSSGRPOTrainer, WMSSGRPOConfig, "wmss", weak_model_name_or_path=tiny["weak"]),
    }
    for name in ("vanilla", "inactive"):  # TRL's GRPO: its `kl`, no weak KL
        assert all("kl" in h and "wmss/kl_weak_ref" not in h for h in runs[name]), name
    assert all(
        "kl" not in h and h["wmss/kl_weak_ref"] >= 0 and torch.isfinite(torch.tensor(h["wmss/kl_weak_ref"]))
        for h in runs["wmss"]
    )
    assert runs["wmss"][0]["wmss/kl_weak_ref"] > 0  # the weak model differs from the policy from step 1
    assert runs["vanilla"][0]["kl"] == 0.0  # the policy copy is the policy itself at step 1
