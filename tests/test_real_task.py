"""The real-model task (wmss_trl.real_task): answer extraction, the reasoning-gym reward wrapper, the splits.

No model and no download. The reward tests use a stand-in scorer where reasoning-gym is not needed; the tests that
draw problems need the `reasoning-gym` package (in the `test` and `real` extras).
"""

import json
import sys

import pytest

from wmss_trl import real_task
from wmss_trl.real_task import extract_answer, get_reasoning_gym_reward


def test_extract_answer():
    assert extract_answer("The final answer is 12.") == "12"
    assert extract_answer("7 - 9 = -2") == "-2"
    assert extract_answer("1,234") == "1,234"
    assert extract_answer("first 3, then <answer> 41 </answer> and 5") == "41"
    assert extract_answer("no number here") is None
    assert extract_answer("") is None


class ExactScorer:
    """Stand-in for a reasoning-gym dataset: records the entries it is asked about."""

    def __init__(self):
        self.calls = []

    def score_answer(self, answer, entry):
        self.calls.append((answer, entry))
        return 1.0 if answer == entry["answer"] else 0.0


def test_reward_wrapper_columns_and_conversational_completions():
    scorer = ExactScorer()
    reward = get_reasoning_gym_reward(scorers={"toy": scorer})
    completions = [
        [{"role": "assistant", "content": "It is 5."}],
        [{"role": "assistant", "content": "6"}],
        [{"role": "assistant", "content": "I do not know"}],
    ]
    out = reward(
        prompts=[None] * 3,
        completions=completions,
        answer=["5", "5", "5"],
        rg_dataset=["toy"] * 3,
        rg_entry=[json.dumps({"k": 1})] * 3,
        question=["q"] * 3,
        trainer_state=None,
    )
    assert out == [1.0, 0.0, 0.0]
    # the answer-less completion is not sent to the scorer; metadata arrives decoded
    assert [a for a, _ in scorer.calls] == ["5", "6"]
    assert scorer.calls[0][1] == {"question": "q", "answer": "5", "metadata": {"k": 1}}


def test_reward_wrapper_errors_and_default_dataset():
    reward = get_reasoning_gym_reward(scorers={"toy": lambda a, e: float(a == e["answer"])}, default_dataset="toy")
    assert reward(completions=["3", "4"], answer=["3", "3"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        reward(completions=["3"])
    with pytest.raises(ValueError, match="lengths"):
        reward(completions=["3", "4"], answer=["3"])
    no_default = get_reasoning_gym_reward(scorers={"toy": ExactScorer()})
    with pytest.raises(ValueError, match="rg_dataset"):
        no_default(completions=["3"], answer=["3"])


def test_reward_wrapper_resolves_by_dotted_name():
    from wmss_trl.rewards import resolve_reward_funcs

    (func,) = resolve_reward_funcs(["wmss_trl.real_task.reasoning_gym_reward"])
    assert func is real_task.reasoning_gym_reward


# ---- with reasoning-gym: its own scorer and the splits


def test_real_scorer_through_wrapper():
    import reasoning_gym  # noqa: F401  (in the `test` extra: these tests always run)

    rows = real_task.generate_rows("chain_sum_2d2t", 4, seed=0)
    right = [f"The answer is {r['answer']}." for r in rows]
    wrong = [str(int(r["answer"]) + 1) for r in rows]
    cols = {k: [r[k] for r in rows] for k in ("answer", "rg_dataset", "rg_entry", "question")}
    assert real_task.reasoning_gym_reward(completions=right, **cols) == [1.0] * 4
    assert real_task.reasoning_gym_reward(completions=wrong, **cols) == [0.0] * 4
    # the task's own partial credit: the oracle as a substring of the answer ("-4" vs "4" is 0.5)
    entry = {"answer": ["4"], "rg_dataset": ["chain_sum"], "rg_entry": ["{}"], "question": ["0 + 4 ="]}
    assert real_task.reasoning_gym_reward(completions=["-4"], **entry) == [0.5]
    assert not real_task.exact_correct(0.5) and real_task.exact_correct(1.0)


def test_splits_fixed_disjoint_and_prompts():
    import reasoning_gym  # noqa: F401  (in the `test` extra: these tests always run)

    a = real_task.build_splits("chain_sum_2d2t", n_train=40, n_eval=30, train_seed=0, eval_seed=1)
    b = real_task.build_splits("chain_sum_2d2t", n_train=40, n_eval=30, train_seed=0, eval_seed=1)
    assert a["train"]["question"] == b["train"]["question"] and a["test"]["question"] == b["test"]["question"]
    assert len(a["train"]) == 40 and len(a["test"]) == 30
    assert not set(a["train"]["question"]) & set(a["test"]["question"])
    assert len(set(a["train"]["question"])) == 40
    row = a["train"][0]
    assert row["prompt"] == [{"role": "user", "content": row["question"] + "\n" + real_task.INSTRUCTION}]
    assert row["rg_dataset"] == "chain_sum" and isinstance(json.loads(row["rg_entry"]), dict)
    other = real_task.build_splits("chain_sum_2d2t", n_train=40, n_eval=30, train_seed=5, eval_seed=1)
    assert other["train"]["question"] != a["train"]["question"]
    with pytest.raises(ValueError, match="differ"):
        real_task.build_splits("chain_sum_2d2t", 4, 4, train_seed=3, eval_seed=3)


def test_small_configuration_runs_out_of_problems():
    import reasoning_gym  # noqa: F401  (in the `test` extra: these tests always run)

    # 1-digit products: at most 100 distinct questions; 90 train leave too few for 50 held-out
    with pytest.raises(ValueError, match="distinct problems"):
        real_task.build_splits("products_1d", n_train=90, n_eval=50)


def test_missing_reasoning_gym_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[real\]"'):
        real_task.build_splits("chain_sum", 4, 2)
