"""wmss_trl.evaluation: pass@k against brute force, the t CIs against tables, reward calls against TRL's
GRPOTrainer, and the evaluation of a tiny model (greedy, seeded samples, the GRPO sampling settings)."""

import itertools
import math

import pytest
import torch
from datasets import Dataset

from wmss_trl.evaluation import call_reward_funcs, evaluate_model, mean_ci, pass_at_k, summarize, t_quantile


def brute_force_pass_at_k(n, c, k):
    """The fraction of the C(n, k) k-subsets of n samples (c of them passing) that hold a passing sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    # large n: the product form stays exact where the binomials are huge
    assert pass_at_k(200, 3, 16) == pytest.approx(1 - math.comb(197, 16) / math.comb(200, 16), rel=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((4, 1, 5), (4, 5, 1), (4, -1, 1), (4, 1, 0)):
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(n, c, k)


def test_t_quantile_and_mean_ci_against_tables():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045, 100: 1.984}  # t_{0.975, df}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)
    values = [0.2, 0.5, 0.3, 0.6]
    sd = (sum((v - 0.4) ** 2 for v in values) / 3) ** 0.5
    stat = mean_ci(values)
    assert stat["mean"] == pytest.approx(0.4) and stat["ci"] == pytest.approx(3.182 * sd / 2, rel=1e-3)
    assert mean_ci([0.3])["ci"] is None and mean_ci([])["mean"] is None


def test_reward_funcs_are_called_as_grpo_trainer_calls_them(tiny, tmp_path):
    """Same kwargs and the same rewards (None -> NaN, weighted sum) as TRL's GRPOTrainer._calculate_rewards."""
    from trl import GRPOConfig, GRPOTrainer

    seen = []

    def length(prompts, completions, completion_ids, **kwargs):
        seen.append(sorted(kwargs))
        return [float(len(c[0]["content"])) if i % 3 else None for i, c in enumerate(completions)]

    def answer_match(prompts, completions, answer, **kwargs):
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1), "idx": i} for i in range(4)]
    completions = [[{"role": "assistant", "content": t}] for t in ("1", "3", "xx", "4")]
    ids = [[5, 1], [7], [9, 9], [8]]
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2,
        per_device_train_batch_size=2, reward_weights=[0.5, 2.0], max_completion_length=4,
    )  # fmt: skip
    trainer = GRPOTrainer(
        tiny["strong"], reward_funcs=[length, answer_match], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tiny["tokenizer"],
    )  # fmt: skip
    expected = trainer._calculate_rewards(rows, [r["prompt"] for r in rows], completions, ids)
    expected_total = (expected * trainer.reward_weights).nansum(dim=1)
    trl_kwargs = seen.pop()
    columns = {k: [r[k] for r in rows] for k in ("answer", "idx")}
    per_func, total = call_reward_funcs(
        [length, answer_match], [r["prompt"] for r in rows], completions, ids, columns, [0.5, 2.0], trainer.state
    )
    assert seen.pop() == trl_kwargs
    assert torch.allclose(torch.tensor(per_func), expected, equal_nan=True)
    assert torch.allclose(torch.tensor(total), expected_total)


def _dataset(n=6):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)} for i in range(n)]
    )


def test_evaluate_model_greedy_seeded_samples_and_sampling_settings(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from wmss_trl.grpo import WMSSGRPOConfig

    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    tok = tiny["tokenizer"]
    data = _dataset()
    calls = []

    def has_digit(prompts, completions, answer, **kwargs):
        calls.append([c[0]["content"] for c in completions])
        return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    def config(**kw):
        return WMSSGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                              max_completion_length=6, **kw)  # fmt: skip

    result = evaluate_model(model, tok, data, [has_digit], config(), num_samples=4, seed=0, batch_size=4)
    greedy_texts = calls[0] + calls[2]  # batches of 4 and 2 prompts: greedy then sampled, per batch
    # greedy = argmax decoding of the chat-rendered prompt, computed here independently
    for row, text in zip(data, greedy_texts):
        enc = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        assert text == tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    sampled = calls[1] + calls[3]
    assert result["passed"] == [
        sum(any(ch.isdigit() for ch in t) for t in sampled[4 * i : 4 * i + 4]) for i in range(6)
    ]
    assert result["greedy_pass"] == [int(any(ch.isdigit() for ch in t)) for t in greedy_texts]
    metrics = summarize(result, [1, 2, 4])
    assert metrics["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in result["passed"]) / 6)
    assert metrics["mean reward"] == pytest.approx(sum(result["passed"]) / 24)
    with pytest.raises(ValueError, match="k <= n = 4"):
        summarize(result, [8])

    # seeded: the same samples again; another seed, other samples
    calls.clear()
    assert evaluate_model(model, tok, data, [has_digit], config(), num_samples=4, seed=0, batch_size=4) == result
    assert calls[1] + calls[3] == sampled
    calls.clear()
    evaluate_model(model, tok, data, [has_digit], config(), num_samples=4, seed=1, batch_size=4)
    assert calls[1] + calls[3] != sampled
    # the config's sampling settings reach generate: top_k = 1 samples the greedy completion every time
    calls.clear()
    evaluate_model(model, tok, data, [has_digit], config(top_k=1), num_samples=3, seed=0, batch_size=6)
    assert calls[1] == [t for t in greedy_texts for _ in range(3)]


def test_evaluate_model_with_the_reasoning_gym_reward(tiny, tmp_path):
    pytest.importorskip("reasoning_gym")
    from transformers import AutoModelForCausalLM

    from wmss_trl.grpo import WMSSGRPOConfig
    from wmss_trl.real_task import build_splits, reasoning_gym_reward

    held_out = build_splits("chain_sum_1d2t", n_train=4, n_eval=4)["test"]
    model = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    args = WMSSGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_completion_length=4
    )
    seen = []

    def recorded(prompts, completions, **kwargs):
        rewards = reasoning_gym_reward(prompts=prompts, completions=completions, **kwargs)
        seen.append((completions, {k: kwargs[k] for k in ("answer", "rg_dataset", "rg_entry")}, rewards))
        return rewards

    result = evaluate_model(model, tiny["tokenizer"], held_out, [recorded], args, num_samples=2, seed=0)
    assert result["num_prompts"] == 4 and len(result["passed"]) == 4
    completions, columns, rewards = seen[1]  # the sampled pass: each row's columns repeated per sample
    assert columns["answer"] == [a for a in held_out["answer"] for _ in range(2)]
    assert [r / 2 for r in map(sum, zip(rewards[::2], rewards[1::2]))] == pytest.approx(result["sample_reward"])
