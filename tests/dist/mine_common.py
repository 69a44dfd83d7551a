"""A deterministic verifier and prompt set shared by the mining tests (single- and multi-process)."""

from datasets import Dataset

VERIFIER = "mine_common.parity_verifier"


def parity_verifier(prompts, completions, completion_ids=None, kind=None, **kwargs):
    """Deterministic stand-in for a real checker: 'right' prompts -> every answer correct, 'na' -> not applicable,
    otherwise an answer is correct when the sum of its character codes is divisible by 3."""
    assert completion_ids is not None and len(completion_ids) == len(completions)
    out = []
    for completion, ids, k in zip(completions, completion_ids, kind, strict=True):
        assert isinstance(completion, list) and completion[0]["role"] == "assistant"  # conversational, like GRPO
        if k == "na":
            out.append(None)
        elif k == "right":
            out.append(1.0)
        else:
            out.append(float(sum(map(ord, completion[0]["content"])) % 3 == 0))
    return out


def mining_prompts(n: int = 12) -> Dataset:
    """Conversational prompts with a reference answer; every 5th is always right, every 7th not applicable."""
    rows = []
    for i in range(n):
        kind = "right" if i % 5 == 4 else ("na" if i % 7 == 6 else "normal")
        rows.append({"prompt": [{"role": "user", "content": f"{i % 10}+{(3 * i) % 10}="}],
                     "solution": str(i % 10 + (3 * i) % 10), "kind": kind})
    return Dataset.from_list(rows)
