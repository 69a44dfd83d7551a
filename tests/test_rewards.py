"""Reward functions by name: TRL's verifiers under TRL's names; ours only for what TRL's `accuracy_reward` cannot
read."""

import pytest
import trl.rewards

from wmss_trl.rewards import math_verify_reward, numeric_accuracy_reward, resolve_reward_funcs


def test_trl_names_resolve_to_trls_own_functions():
    """Every name `trl grpo --reward_funcs` accepts (trl/scripts/grpo.py) resolves, to TRL's function."""
    acc, reasoning, think, overlong = resolve_reward_funcs(
        ["accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment"]
    )
    assert acc is trl.rewards.accuracy_reward and reasoning is trl.rewards.reasoning_accuracy_reward
    assert think is trl.rewards.think_format_reward
    # TRL's script builds it with max_completion_len=1280, soft_punish_cache=256: no penalty up to 1024 tokens,
    # then -1/256 per token over it
    assert overlong(completion_ids=[[0] * 1024, [0] * 1152]) == [0.0, pytest.approx(-0.5)]
    assert resolve_reward_funcs(["numeric_accuracy_reward", "math_verify_reward"]) == [
        numeric_accuracy_reward,
        math_verify_reward,
    ]


def conv(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_boxed_answers_all_verifiers_agree():
    """Where TRL's accuracy_reward does the job (\\boxed answers, conversational, `solution`), ours score the same."""
    texts = ["so \\boxed{42}", "\\boxed{41}", "thus \\boxed{0.5}", "\\boxed{7}"]
    solution = ["42", "42", "0.5", "8"]
    expected = [1.0, 0.0, 1.0, 0.0]
    assert trl.rewards.accuracy_reward(conv(texts), solution) == expected
    assert math_verify_reward(completions=conv(texts), solution=solution) == expected
    assert numeric_accuracy_reward(completions=conv(texts), solution=solution) == expected


def test_what_only_ours_read():
    """The cases the docstrings give as the reason ours exist: TRL's accuracy_reward scores them 0.0 or fails."""
    plain = ["The answer is 42", "$42$", "48/2 = 24 ...\n#### 42"]
    assert trl.rewards.accuracy_reward(conv(plain), ["42"] * 3) == [0.0, 0.0, 0.0]
    assert numeric_accuracy_reward(completions=conv(plain), solution=["42"] * 3) == [1.0, 1.0, 1.0]
    assert numeric_accuracy_reward(completions=plain, answer=["42"] * 3) == [1.0, 1.0, 1.0]  # strings, `answer`
    with pytest.raises(TypeError):  # TRL's reads completion[0]["content"]: plain-string completions fail
        trl.rewards.accuracy_reward(plain, ["42"] * 3)
    unboxed = ["it is 1/2", "$\\frac{3}{4}$"]
    assert trl.rewards.accuracy_reward(conv(unboxed), ["0.5", "0.75"]) == [0.0, 0.0]
    assert math_verify_reward(completions=unboxed, answer=["0.5", "0.75"]) == [1.0, 1.0]
    assert numeric_accuracy_reward(completions=unboxed, answer=["0.5", "0.75"]) == [0.0, 0.0]  # reads 2 and 4
