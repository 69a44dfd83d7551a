"""`wmss demo` (the README's main command) end to end with tiny step counts, and the embedded task."""

import json
import os
import subprocess
import sys

from wmss_trl.tasks import correctness_reward, final_answer, load_embedded


def test_embedded_task_splits_are_disjoint_and_verifiable():
    data = load_embedded("arith", sizes={"train": 500, "test": 100, "ood": 50})
    train = {r["prompt"][0]["content"] for r in data["train"]}
    assert not train & {r["prompt"][0]["content"] for r in data["test"]}
    for row in data["ood"]:
        assert row["completion"][0]["content"].count("\n") == 3  # 3 worked steps + the answer line
    for row in data["train"]:
        text = row["completion"][0]["content"]
        assert final_answer(text) == row["answer"]
        for step in text.split("\n")[:-1]:  # every worked step is correct arithmetic
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 - digits and +/- only
    good = [[{"role": "assistant", "content": "1+2=3\n#### 3"}]]
    bad = [[{"role": "assistant", "content": "1+2=4\n#### 4"}]]
    assert correctness_reward(None, good, answer=["3"]) == [1.0]
    assert correctness_reward(None, bad, answer=["3"]) == [0.0]


def test_demo_command_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wmss_trl.cli", "demo", "--output_dir", str(tmp_path), "--weak_steps", "20",
           "--strong_steps", "10", "--arm_steps", "6", "--grpo_steps", "2", "--eval_every", "3",
           "--arms", "sft,wmss,grpo,wmss_grpo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "held-out" in proc.stdout and "wmss_grpo" in proc.stdout
    results = json.load(open(tmp_path / "results_seed0.json"))
    assert set(results["arms"]) == {"sft", "wmss", "grpo", "wmss_grpo"}
    for arm, r in results["arms"].items():
        assert 0.0 <= r["test"] <= 1.0 and 0.0 <= r["ood"] <= 1.0
        assert r["steps"] == (2 if "grpo" in arm else 6)
        assert [p["step"] for p in r["curve"]][0] == 0 and r["curve"][-1]["step"] == r["steps"]
    assert os.path.getsize(tmp_path / "accuracy.png") > 10_000
