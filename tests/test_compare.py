"""`wmss compare` end to end on tiny toy models: table + JSON + PNGs, resume skips finished runs, a failing arm."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wmss_trl.evaluation import mean_ci, pass_at_k
from wmss_trl.recipes import compare


def broken_reward(prompts, completions, **kwargs):
    """A reward function that fails: the `broken` arm of the tests overrides `reward_funcs` with it."""
    raise RuntimeError("broken_reward: this arm is meant to fail")


ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("metrics_vs_step.png", "pass_at_k.png")


def write_config(root: Path, arms: str = "") -> Path:
    """A `wmss grpo` YAML on the embedded task with the toy checkpoints (lr high enough for 2 steps to move them)."""
    from wmss_trl.tasks import CHARSET
    from wmss_trl.toy import save_toy_checkpoints

    weak, strong = save_toy_checkpoints(str(root / "toy"), CHARSET)
    config = root / "run.yaml"
    config.write_text(
        f"model_name_or_path: {strong}\nweak_model_name_or_path: {weak}\ndataset_name: wmss:arith\n"
        "reward_funcs: [wmss_trl.tasks.correctness_reward, tests.dist.grpo_common.digit_fraction]\n"
        "max_steps: 2\nper_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 8\n"
        "learning_rate: 0.01\nnum_weak_generations: 2\nentropy_weighted_advantages: true\n"
        "report_to: none\nbf16: false\nactivation_checkpointing: false\nlogging_steps: 1\nsave_strategy: 'no'\n" + arms
    )
    return config


def compare_cmd(config, out, *extra):
    return [
        sys.executable, "-m", "wmss_trl.cli", "compare", "--config", str(config), "--output_dir", str(out),
        "--seeds", "0,1", "--k", "1,2", "--max_eval_prompts", "4", "--eval_steps", "1", *extra,
    ]  # fmt: skip


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """vanilla, wmss and a `broken` arm (its reward function raises) x seeds 0, 1, 2 steps, in one command."""
    root = tmp_path_factory.mktemp("compare")
    config = write_config(root, "arms:\n  broken: {reward_funcs: [tests.test_compare.broken_reward]}\n")
    out = root / "out"
    proc = run(compare_cmd(config, out))
    return {"config": config, "out": out, "proc": proc}


@pytest.mark.slow
def test_compare_two_arms_two_seeds_writes_table_json_and_plots(first_run):
    out = first_run["out"]
    report = json.loads((out / "compare.json").read_text())
    summary = report["summary"]
    assert set(summary["arms"]) == {"vanilla", "wmss"} and report["seeds"] == [0, 1]
    assert report["provenance"]["config_hash"] and report["provenance"]["versions"]["trl"]
    # the statistics, recomputed from the stored per-prompt counts
    for arm in ("vanilla", "wmss"):
        finals = [report["runs"][arm][str(s)]["evals"][-1] for s in (0, 1)]
        assert [e["step"] for e in report["runs"][arm]["0"]["evals"]] == [1, 2]  # --eval_steps 1: checkpoint-1, end
        p2 = [sum(pass_at_k(2, c, 2) for c in e["result"]["passed"]) / 4 for e in finals]
        assert summary["arms"][arm]["final"]["pass@2"]["mean"] == pytest.approx(mean_ci(p2)["mean"])
        assert summary["arms"][arm]["final"]["pass@2"]["ci"] == pytest.approx(mean_ci(p2)["ci"])
        assert summary["arms"][arm]["step_seconds"]["mean"] > 0
    paired = summary["arms"]["wmss"]["vs_vanilla"]
    d = [
        summary["arms"]["wmss"]["per_seed"][s]["mean reward"]
        - summary["arms"]["vanilla"]["per_seed"][s]["mean reward"]
        for s in ("0", "1")
    ]
    assert paired["mean reward"]["mean"] == pytest.approx(sum(d) / 2) and paired["step_time_ratio"]["n"] == 2
    # the arms ran as said: vanilla with every WMSS option at its default, wmss with the config's
    import yaml

    vanilla = yaml.safe_load((out / "runs/vanilla/seed1/run.yaml").read_text())
    wmss = yaml.safe_load((out / "runs/wmss/seed1/run.yaml").read_text())
    assert vanilla["weak_model_name_or_path"] is None and vanilla["num_weak_generations"] == 0
    assert wmss["num_weak_generations"] == 2 and wmss["seed"] == wmss["data_seed"] == vanilla["seed"] == 1
    assert "weak model replicated" in (out / "runs/wmss/seed1/train.log").read_text()
    table = (out / "compare.md").read_text()
    assert "| vanilla | 2 | 2 |" in table and "| wmss | 2 |" in table and "TRL's GRPOTrainer" in table
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_failing_arm_is_named_and_the_other_arms_are_kept(first_run):
    proc, out = first_run["proc"], first_run["out"]
    assert proc.returncode == 1
    assert "arm(s) broken" in proc.stderr and "broken_reward: this arm is meant to fail" in proc.stdout + proc.stderr
    report = json.loads((out / "compare.json").read_text())
    assert len(report["failures"]) == 2 and all("'broken'" in f for f in report["failures"])
    for arm in ("vanilla", "wmss"):
        for seed in (0, 1):
            assert (out / f"runs/{arm}/seed{seed}/result.json").is_file()
    assert not (out / "runs/broken/seed0/result.json").exists()


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_refuses_other_settings(first_run):
    out = first_run["out"]
    logs = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("runs/*/seed*/train.log")}
    results = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/result.json")}
    proc = run(compare_cmd(first_run["config"], out, "--arms", "vanilla,wmss"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, skipped") + proc.stderr.count("finished earlier, skipped") == 4
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in logs} == logs  # no run trained again
    assert {p: p.stat().st_mtime_ns for p in results} == results
    with pytest.raises(SystemExit, match="made with other settings .*num_prompts: 4 there, 3 now"):
        compare.main(compare_cmd(first_run["config"], out, "--max_eval_prompts", "3")[4:])


def test_bad_input_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    config = write_config(tmp_path, "arms:\n  typo: {entropy_weighted_advantage: false}\n")
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="arm 'typo' overrides unknown field 'entropy_weighted_advantage'.*"
                       "Did you mean entropy_weighted_advantages"):  # fmt: skip
        compare.main(argv)
    config = write_config(tmp_path)
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--k 1,8 needs n >= 8 samples per prompt, but --num_eval_samples is 4"):
        compare.main([*argv, "--k", "1,8", "--num_eval_samples", "4"])
    with pytest.raises(SystemExit, match="unknown or repeated arm.*'nope'"):
        compare.main([*argv, "--arms", "vanilla,nope"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match="no eval set: .* has no split 'test'"):
        compare.main([*argv, "--dataset_name", str(prompts)])
    with pytest.raises(SystemExit, match="arm 'x' overrides 'max_steps'"):
        compare.main(["--config", str(write_config(tmp_path, "arms:\n  x: {max_steps: 5}\n")), *argv[2:]])
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.slow
@pytest.mark.distributed
def test_runs_under_accelerate_with_accelerate_config(tmp_path):
    """`--accelerate_config ddp --num_processes 2` reaches each run (not the compare process itself)."""
    config = write_config(tmp_path)
    out = tmp_path / "out"
    cmd = compare_cmd(config, out, "--arms", "wmss", "--accelerate_config", "ddp", "--num_processes", "2")
    proc = run([c if c != "0,1" else "0" for c in cmd])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wmss grpo: 2 process(es)" in (out / "runs/wmss/seed0/train.log").read_text()
    assert json.loads((out / "compare.json").read_text())["summary"]["arms"]["wmss"]["seeds"] == [0]


def test_equal_time_steps_follow_cpu_time_not_wall_time():
    """The equal-time vanilla arm gets vanilla's steps scaled by the CPU-time ratio of the two runs, whatever their
    wall times say (here the WMSS run's wall time is the smaller one, as load from other jobs can make it); records
    without CPU time fall back to the wall-time rule."""
    from types import SimpleNamespace

    from wmss_trl.recipes.compare.runs import equal_time_steps

    plan = SimpleNamespace(arms=["vanilla", "wmss", "vanilla_equal_time"])
    vanilla = {"steps": 300, "start_step": 0, "train_runtime": 600.0, "step_seconds": 2.0, "cpu_seconds": 300.0}
    wmss = {"steps": 300, "start_step": 0, "train_runtime": 450.0, "step_seconds": 1.5, "cpu_seconds": 390.0}
    runs = {"vanilla": {0: {"train": vanilla}}, "wmss": {0: {"train": wmss}}}
    assert equal_time_steps(plan, runs, 0) == 390  # 300 * 390 / 300, not 450 / 2.0 = 225
    old = {k: v for k, v in wmss.items() if k != "cpu_seconds"}
    assert equal_time_steps(plan, {**runs, "wmss": {0: {"train": old}}}, 0) == 225
    with pytest.raises(RuntimeError, match="needs the vanilla and wmss runs of seed 1"):
        equal_time_steps(plan, runs, 1)


def test_cpu_time_per_step_and_its_ratio():
    """CPU seconds per step are the run's CPU time over the steps it ran (a resumed run: since its start step); the
    ratio vs vanilla is per seed, skipping records made before CPU time was recorded."""
    from wmss_trl.recipes.compare.report import _ratios, cpu_step_seconds

    assert cpu_step_seconds({"steps": 300, "start_step": 100, "cpu_seconds": 400.0}) == 2.0
    assert cpu_step_seconds({"steps": 300, "step_seconds": 1.0}) is None
    runs = {
        "vanilla": {
            0: {"train": {"steps": 10, "cpu_seconds": 10.0}},
            1: {"train": {"steps": 10, "cpu_seconds": 20.0}},
        },
        "wmss": {0: {"train": {"steps": 10, "cpu_seconds": 15.0}}, 1: {"train": {"steps": 10, "cpu_seconds": 30.0}}},
    }
    ratio = _ratios(runs, "wmss", [0, 1], cpu_step_seconds)
    assert ratio["mean"] == 1.5 and ratio["n"] == 2 and ratio["ci"] == 0.0
    del runs["wmss"][1]["train"]["cpu_seconds"]
    assert _ratios(runs, "wmss", [0, 1], cpu_step_seconds)["n"] == 1
