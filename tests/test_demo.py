"""`wmss demo` (the README's main command) end to end with tiny step counts, its numerics pins, and the embedded task."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from wmss_trl.recipes import demo
from wmss_trl.tasks import correctness_reward, final_answer, load_embedded


# Run the CLI the way the `wmss` console script does (wmss_trl.cli:main), and report the pin variables as they are
# at the moment something first imports torch.
SPY = """
import importlib.abc, importlib.util, json, os, sys
class Spy(importlib.abc.MetaPathFinder):  # availability probes (find_spec) do not count, only executing torch
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        run = spec.loader.exec_module
        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                keys = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
                print("ENV_AT_TORCH_IMPORT " + json.dumps({k: os.environ.get(k) for k in keys}), file=sys.stderr)
            run(module)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Spy())
from wmss_trl.cli import main
sys.exit(main(sys.argv[1:]))
"""
QUICK = [
    "--weak_steps",
    "20",
    "--strong_steps",
    "10",
    "--arm_steps",
    "6",
    "--grpo_steps",
    "2",
    "--eval_every",
    "3",
    "--arms",
    "sft,wmss,grpo,wmss_grpo",
]


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


def _run(args, env):
    return subprocess.run(
        [sys.executable, "-c", SPY, "demo", *args], capture_output=True, text=True, timeout=1800, env=env
    )


def test_demo_command_runs_end_to_end(tmp_path):
    """Pins in the environment when torch starts (the user's own MKL_CBWR kept), a header per phase, the table, the
    one-line reading, results / trainer states / plot; then a rerun with other numerics is refused."""
    env = {k: v for k, v in os.environ.items() if k not in demo.NUMERICS_PINS}
    env["MKL_CBWR"] = "AVX2,STRICT"  # the user's own value: kept, and said to differ from the demo's
    proc = _run(["--output_dir", str(tmp_path), *QUICK], env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = proc.stdout

    seen = json.loads(proc.stderr.split("ENV_AT_TORCH_IMPORT ", 1)[1].splitlines()[0])
    pinned = "avx2" if demo.numerics._has_avx2() else None
    assert seen == {
        "MKL_CBWR": "AVX2,STRICT",
        "ATEN_CPU_CAPABILITY": pinned,
        "ONEDNN_MAX_CPU_ISA": pinned and "AVX2",
        "OMP_NUM_THREADS": "1",
    }
    assert "numerics: MKL_CBWR=AVX2,STRICT (yours)" in out and "OMP_NUM_THREADS=1 (pinned by the demo)" in out
    assert "MKL_CBWR=AVX2,STRICT (the demo's: AVX2): kept, but the table may differ" in proc.stderr
    if pinned:
        assert "ATEN_CPU_CAPABILITY=avx2 (pinned by the demo)" in out and "ATen kernels in effect AVX2" in out

    headers = [
        "[1/4] weak checkpoint:",
        "[2/4] strong checkpoint:",
        "[3/4] WD-DS entropies:",
        "[4/4] arm 1/4 sft: continued SFT",
        "[4/4] arm 2/4 wmss: WMSS",
        "[4/4] arm 3/4 grpo: TRL's GRPO",
        "[4/4] arm 4/4 wmss_grpo: WMSS-GRPO",
        "greedy accuracy (%) from the strong checkpoint",
        "RL through wmss_trl.evaluation (the code of `wmss compare`): 200 held-out problems, n = 4 samples",
        "Reading: WMSS is",
        "plot:",
    ]
    positions = [out.index(h) for h in headers]
    assert positions == sorted(positions), out
    assert "6 steps from the strong checkpoint" in out and "(~" in out
    reading = next(line for line in out.splitlines() if line.startswith("Reading:"))
    assert "WMSS-GRPO is" in reading and "One seed says little" in reading and "docs/results.md" in reading

    results = json.load(open(tmp_path / "results_seed0.json"))
    assert set(results["arms"]) == {"sft", "wmss", "grpo", "wmss_grpo"}
    assert results["eval_problems"] == {"test": 200, "ood": 200}
    assert results["numerics"]["variables"]["MKL_CBWR"] == "AVX2,STRICT"
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for arm, r in results["arms"].items():
        assert 0.0 <= r["test"] <= 1.0 and 0.0 <= r["ood"] <= 1.0
        assert r["steps"] == (2 if "grpo" in arm else 6)
        curve = r["curve"]
        strong = results["phases"]["strong"]
        assert curve[0] == {"step": 0, "test": strong["test"], "ood": strong["ood"]}
        assert [p["step"] for p in curve[1:]] == ([2] if "grpo" in arm else [3, 6])
        assert (curve[-1]["test"], curve[-1]["ood"]) == (r["test"], r["ood"])  # the table is the curve's last point
        logged = [
            h
            for h in json.load(open(run_dir / arm / "trainer_state.json"))["log_history"]
            if "eval_test_accuracy" in h
        ]  # the library's record holds the same curve
        assert [(h["step"], h["eval_test_accuracy"], h["eval_ood_accuracy"]) for h in logged] == [
            (p["step"], p["test"], p["ood"]) for p in curve[1:]
        ]
    assert os.path.getsize(tmp_path / "accuracy.png") > 10_000

    # the RL arms and the strong checkpoint through wmss_trl.evaluation: greedy pass@1, pass@k (k = 1, 2, 4), reward
    rl = {
        "strong": results["phases"]["strong"],
        "grpo": results["arms"]["grpo"],
        "wmss_grpo": results["arms"]["wmss_grpo"],
    }
    for name, r in rl.items():
        m = r["pass_at_k"]
        assert list(m) == ["greedy pass@1", "pass@1", "pass@2", "pass@4", "mean reward"]
        assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]
        assert m["mean reward"] == pytest.approx(m["pass@1"])  # a 0/1 reward: mean reward is the sampled pass@1
        assert m["greedy pass@1"] == pytest.approx(r["test"], abs=0.02)  # = the greedy held-out accuracy
        row = next(line for line in out.splitlines() if line.startswith(f"{name} ") and line.count(".") == 5)
        assert [float(v) for v in row.split()[1:]] == pytest.approx([100 * v for v in m.values()], abs=0.051)
    assert "pass_at_k" not in results["arms"]["sft"]

    # the cached checkpoints were made with MKL_CBWR=AVX2,STRICT: with other numerics they are refused, not reused
    env.pop("MKL_CBWR")
    again = _run(["--output_dir", str(tmp_path), *QUICK], env)
    assert again.returncode != 0
    assert "holds checkpoints made with other settings" in again.stderr and "MKL_CBWR" in again.stderr


def test_pin_numerics_keeps_the_users_values_and_warns_when_torch_chose_its_kernels(monkeypatch):
    import torch

    torch.ones(4).exp()  # ATen has now chosen its kernels in this process
    for name in demo.NUMERICS_PINS:  # setenv + delenv: monkeypatch restores the original state afterwards
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = demo.pin_numerics()
    messages = " | ".join(str(w.message) for w in caught)
    assert os.environ["OMP_NUM_THREADS"] == "2" and state["OMP_NUM_THREADS"] == "2 (yours)"
    assert "OMP_NUM_THREADS=2 (the demo's: 1)" in messages
    if demo.numerics._has_avx2():
        assert os.environ["MKL_CBWR"] == "AVX2" and state["MKL_CBWR"] == "AVX2 (pinned by the demo)"
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        native = torch.backends.cpu.get_cpu_capability()
        assert ("torch ran kernels before `wmss demo` pinned the numerics" in messages) == (native != "AVX2")
    else:
        assert "MKL_CBWR" not in os.environ and state["MKL_CBWR"].startswith("unset (not pinned")


def test_bad_arm_is_refused_before_torch_loads():
    with pytest.raises(ValueError, match="unknown arm.*'sfx'.*choose among"):
        demo.DemoArguments(arms="sft,sfx")
    proc = subprocess.run(
        [sys.executable, "-c", SPY, "demo", "--arms", "sft,sfx"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "wmss demo: --arms: unknown arm(s) ['sfx']" in proc.stderr
    assert "ENV_AT_TORCH_IMPORT" not in proc.stderr and "Traceback" not in proc.stderr
