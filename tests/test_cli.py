"""The `wmss` command: TRL-style YAML + flags, in one process and relaunched under accelerate."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM


def write_run(tmp_path, tiny):
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            a, b = i % 10, (3 * i) % 10
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                        "completion": [{"role": "assistant", "content": str(a + b)}],
                    }
                )
                + "\n"
            )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\nweak_model_name_or_path: {tiny['weak']}\ndataset_name: {data}\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nmixing_lambda: 0.4\nreport_to: none\nbf16: false\n"
        "activation_checkpointing: false\nlogging_steps: 1\nsave_strategy: 'no'\n"
    )
    return config


def run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "wmss_trl.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_help_lists_commands():
    out = run(["--help"])
    assert "sft" in out and "--accelerate_config" in out


def test_sft_from_yaml_single_process(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(["sft", "--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert "1 process(es)" in out and "lambda=0.4" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


@pytest.mark.distributed
def test_sft_relaunches_under_accelerate(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(["sft", "--config", str(config), "--output_dir", str(tmp_path / "out"), "--accelerate_config", "ddp"])
    assert "2 process(es), MULTI_CPU" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_unknown_accelerate_config_is_a_clear_error(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    proc = subprocess.run(
        [sys.executable, "-m", "wmss_trl.cli", "sft", "--config", str(config), "--accelerate_config", "zero9"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "zero9" in proc.stderr and "zero3" in proc.stderr


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_worker_flushes_runs_atexit_and_keeps_the_code(world_size):
    """A launched worker leaves with os._exit after the atexit handlers; nothing printed is lost, the code is kept."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "from wmss_trl.recipes.common import exit_worker\n"
        "print('work done', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_worker(3)\n"
        "print('never printed')\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3
    assert proc.stdout.startswith("work done") and "atexit ran" in proc.stdout and "never printed" not in proc.stdout
    assert "to stderr" in proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# Checked before any model loads: safetensors weights only, and a complete checkpoint to resume from
# ------------------------------------------------------------------------------------------------------------------
class ModelLoadReached(Exception):
    pass


@pytest.fixture
def before_loading(monkeypatch):
    """Stop a recipe at its first load (the tokenizer, right before the model): the checks must have run by then."""
    import wmss_trl.recipes.common

    def reached(*args, **kwargs):
        raise ModelLoadReached

    # every training recipe loads through `load_run`, which loads the tokenizer first
    monkeypatch.setattr(wmss_trl.recipes.common, "load_tokenizer", reached)


def pickle_only(tiny, path):
    """A checkpoint folder with `pytorch_model.bin` and no safetensors (transformers 5 always writes safetensors)."""
    import torch
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    model.save_pretrained(path)
    tiny["tokenizer"].save_pretrained(path)
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))
    return str(path)


def recipe_main(command):
    import importlib

    return importlib.import_module(f"wmss_trl.recipes.{command}").main


def recipe_args(tiny, tmp_path, **overrides):
    args = {
        "model_name_or_path": tiny["strong"],
        "weak_model_name_or_path": tiny["weak"],
        "dataset_name": str(tmp_path / "data.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        **overrides,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("command", ["sft", "dpo"])
@pytest.mark.parametrize("role", ["model_name_or_path", "weak_model_name_or_path"])
def test_pickle_only_model_refused_before_loading(tiny, tmp_path, before_loading, command, role):
    folder = pickle_only(tiny, tmp_path / "pickled")
    with pytest.raises(ValueError, match=r"has pickle weights only \(pytorch_model.bin\).*save_pretrained"):
        recipe_main(command)(recipe_args(tiny, tmp_path, **{role: folder}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real output_dir with checkpoint-1 complete and checkpoint-2 missing its optimizer state."""
    from conftest import arithmetic_prompt_completion, cpu_args
    from trl import SFTConfig, SFTTrainer

    from wmss_trl.toy import build_char_tokenizer, build_tiny_model

    out = tmp_path_factory.mktemp("checkpoints") / "out"
    tok = build_char_tokenizer()
    args = cpu_args(SFTConfig, out, save_strategy="steps", save_steps=1, max_steps=2)
    SFTTrainer(
        build_tiny_model(tok), args=args, train_dataset=arithmetic_prompt_completion(8), processing_class=tok
    ).train()
    os.remove(out / "checkpoint-2" / "optimizer.pt")
    return out


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_resume_resolves_to_a_complete_checkpoint(tiny, tmp_path, checkpoints, before_loading, command, caplog):
    args = recipe_args(tiny, tmp_path, output_dir=checkpoints)
    with pytest.raises(ValueError, match=r"checkpoint-2' is not a complete checkpoint: optimizer.pt is missing"):
        recipe_main(command)(args + ["--resume_from_checkpoint", str(checkpoints / "checkpoint-2")])
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"), pytest.raises(ModelLoadReached):
        recipe_main(command)(args + ["--resume_from_checkpoint", "true"])
    assert f"skipping incomplete checkpoint {checkpoints}/checkpoint-2" in caplog.text
    assert f"resuming from {checkpoints}/checkpoint-1" in caplog.text
