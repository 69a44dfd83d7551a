"""Shared fixtures: tiny Qwen2 models and a character tokenizer, built from config and saved locally (no hub)."""

import os
import tempfile


os.environ.setdefault("OMP_NUM_THREADS", "1")
# `wmss <command> --help` caches its text (wmss_trl/cli.py): keep the tests' cache out of the user's home.
os.environ.setdefault("WMSS_CACHE_DIR", tempfile.mkdtemp(prefix="wmss-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a strong and a weak tiny model (same tokenizer, different weights) and the tokenizer."""
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    strong = save_model_and_tokenizer(build_tiny_model(tok, seed=1), tok, str(root / "strong"))
    weak = save_model_and_tokenizer(build_tiny_model(tok, seed=2), tok, str(root / "weak"))
    return {"strong": strong, "weak": weak, "tokenizer": tok, "root": root}


def arithmetic_prompt_completion(n: int = 16, offset: int = 0):
    """A small conversational prompt/completion dataset: 'a+b=' -> 'c'."""
    from datasets import Dataset

    rows = []
    for i in range(offset, offset + n):
        a, b = i % 10, (3 * i) % 10
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "completion": [{"role": "assistant", "content": str(a + b)}],
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture
def sft_dataset():
    return arithmetic_prompt_completion(16)


def cpu_args(cls, output_dir, **kw):
    """Training args for fast deterministic CPU tests."""
    base = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=False,
        logging_steps=1,
        per_device_train_batch_size=4,
        max_steps=2,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="session")
def permuted_weak(tiny):
    """A tiny weak model saved with a tokenizer whose vocabulary is the tiny tokenizer's, permuted: same size, same
    special tokens at the same ids (so the configs' special ids agree too), other ids for the characters.

    Returns ``{"path": folder (config, model.safetensors, tokenizer), "tokenizer": the permuted tokenizer}``.
    """
    from wmss_trl.toy import DEFAULT_CHARS, build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer(DEFAULT_CHARS[::-1])
    assert len(tok) == len(tiny["tokenizer"]) and tok.get_vocab() != tiny["tokenizer"].get_vocab()
    path = save_model_and_tokenizer(build_tiny_model(tok, seed=5), tok, str(tiny["root"] / "permuted_weak"))
    return {"path": path, "tokenizer": tok}


@pytest.fixture(scope="module")
def needs_vllm():
    """For the tests marked ``vllm``: vLLM's CPU settings (1 GiB of KV cache per engine, the engine in this process),
    and a skip with the reason only when vllm is not importable. The core run deselects those tests (-m "not vllm")
    before this runs, so there they are neither run nor skipped."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    pytest.importorskip("vllm", reason="vllm is not installed (pip install '.[vllm]'); CI runs these in its vllm step")
