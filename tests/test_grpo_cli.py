"""`wmss grpo`: TRL-style YAML + flags, a one-switch vanilla baseline, and `accelerate launch ... -m wmss_trl.cli grpo`
under ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM


ROOT = Path(__file__).resolve().parents[1]


def write_run(tmp_path, tiny):
    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            a, b = i % 10, (3 * i) % 10
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\nweak_model_name_or_path: {tiny['weak']}\ndataset_name: {data}\n"
        "reward_funcs: [tests.dist.grpo_common.digit_fraction]\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nnum_generations: 4\nmax_completion_length: 8\n"
        "beta: 0.04\nnum_weak_generations: 2\nentropy_weighted_advantages: true\n"
        "report_to: none\nbf16: false\nactivation_checkpointing: false\nlogging_steps: 1\nsave_strategy: 'no'\n"
    )
    return config


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def logged(out_dir):
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def test_grpo_vanilla_is_one_switch(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(
        [
            sys.executable,
            "-m",
            "wmss_trl.cli",
            "grpo",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "w"),
            "--per_device_train_batch_size",
            "4",
        ]
    )
    assert "WMSS-GRPO: weak model replicated, beta=0.04, num_weak_generations=2" in out
    assert all("wmss/weak_accuracy" in h and "wmss/adv_weight_mean" in h for h in logged(tmp_path / "w"))
    out = run(
        [
            sys.executable,
            "-m",
            "wmss_trl.cli",
            "grpo",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "v"),
            "--per_device_train_batch_size",
            "4",
            "--vanilla",
            "true",
        ]
    )
    assert "vanilla TRL GRPO" in out
    history = logged(tmp_path / "v")
    assert len(history) == 2 and not any(k.startswith("wmss/") for h in history for k in h)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "v"))
    card = (tmp_path / "v" / "README.md").read_text()  # TRL's own trainer wrote TRL's own card, left as it is
    assert "This model was trained with GRPO" in card and "WMSS" not in card
    assert "### WMSS (Weak-Driven Learning)" in (tmp_path / "w" / "README.md").read_text()


@pytest.mark.distributed
def test_accelerate_launch_zero3_module_cli(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "ds_configs" / "zero3.yaml"),
            "-m",
            "wmss_trl.cli",
            "grpo",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert "wmss grpo: 2 process(es), DEEPSPEED, zero_stage=3, WMSS-GRPO: weak model zero3-sharded" in out
    history = logged(tmp_path / "out")
    assert len(history) == 2 and all(
        h["wmss/kl_weak_ref"] > 0 and "kl" not in h and "wmss/weak_negatives_per_group" in h for h in history
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert f"- Weak model: `{tiny['weak']}`" in (tmp_path / "out" / "README.md").read_text()  # the sharded weak model


# ------------------------------------------------------------------------------------------------------------------
# Checked before any model loads: safetensors weights only, and a complete checkpoint to resume from
# ------------------------------------------------------------------------------------------------------------------
class ModelLoadReached(Exception):
    pass


@pytest.fixture
def grpo_main(monkeypatch):
    """`wmss grpo`'s main, stopped at its first load (the tokenizer, right before the model)."""
    import wmss_trl.recipes.common
    import wmss_trl.recipes.grpo

    def reached(*args, **kwargs):
        raise ModelLoadReached

    monkeypatch.setattr(wmss_trl.recipes.common, "load_tokenizer", reached)  # what load_run calls first
    return wmss_trl.recipes.grpo.main


def grpo_args(tiny, tmp_path, **overrides):
    args = {
        "model_name_or_path": tiny["strong"],
        "weak_model_name_or_path": tiny["weak"],
        "dataset_name": str(tmp_path / "prompts.jsonl"),
        "reward_funcs": "numeric_accuracy_reward",
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        **overrides,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("role", ["model_name_or_path", "weak_model_name_or_path", "reward_model_name_or_path"])
def test_grpo_refuses_pickle_only_model_before_loading(tiny, tmp_path, grpo_main, role):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny["strong"]).save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has pickle weights only \(pytorch_model.bin\)"):
        grpo_main(grpo_args(tiny, tmp_path, **{role: folder}))


def test_grpo_resume_resolves_to_a_complete_checkpoint(tiny, tmp_path, grpo_main, caplog):
    from conftest import arithmetic_prompt_completion, cpu_args
    from trl import SFTConfig, SFTTrainer

    from wmss_trl.toy import build_char_tokenizer, build_tiny_model

    out = tmp_path / "out"
    tok = build_char_tokenizer()
    args = cpu_args(SFTConfig, out, save_strategy="steps", save_steps=1, max_steps=2)
    SFTTrainer(
        build_tiny_model(tok), args=args, train_dataset=arithmetic_prompt_completion(8), processing_class=tok
    ).train()
    (out / "checkpoint-2" / "rng_state.pth").write_bytes(b"")  # cut short
    with pytest.raises(ValueError, match=r"checkpoint-2' is not a complete checkpoint: rng_state.pth is not loadable"):
        grpo_main(grpo_args(tiny, tmp_path, resume_from_checkpoint=out / "checkpoint-2"))
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"), pytest.raises(ModelLoadReached):
        grpo_main(grpo_args(tiny, tmp_path, resume_from_checkpoint="true"))
    assert f"skipping incomplete checkpoint {out}/checkpoint-2" in caplog.text
    assert f"resuming from {out}/checkpoint-1" in caplog.text
