"""`wmss pipeline`: config merging, the embedded data, end to end on a tiny model (single process and 2-process
ZeRO-3), skipping finished phases, resuming after an interrupted phase, the bad-input stops, one writer per run folder
(a SIGKILLed driver leaves no orphan, a concurrent run is refused), and the provenance of reused phases."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from wmss_trl.recipes.pipeline import PHASES, load_config, main, make_arithmetic_rows


ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "toy_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "toy_data": {"num_samples": 64, "max_operand": 20},
    "common": {"per_device_train_batch_size": 8, "max_length": 32, "logging_steps": 4},
    "sft": {"num_train_epochs": 4, "learning_rate": 1.0e-2},
    "entropy": {"per_device_eval_batch_size": 16},
}


def write_config(path, cfg=SMALL):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_pipeline(config, output_dir, *extra, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "wmss_trl.cli",
        "pipeline",
        "--config",
        config,
        "--output_dir",
        str(output_dir),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ok(proc):
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc.stdout


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def entropy_rows(path):
    return {r["idx"]: r for r in map(json.loads, open(path))}


# ------------------------------------------------------------------------------------------------------------------
# Pure parts
# ------------------------------------------------------------------------------------------------------------------
def test_config_merge_and_unknown_keys(tmp_path):
    default = load_config()
    assert default["selection"]["selection_mode"] == "resample" and default["base_model"] is None
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"wdjt": {"mixing_lambda": 0.4}, "output_dir": "x"}))
    cfg = load_config(str(user), {"output_dir": str(tmp_path / "o")})
    assert cfg["wdjt"]["mixing_lambda"] == 0.4
    assert cfg["wdjt"]["num_train_epochs"] == default["wdjt"]["num_train_epochs"]  # merged key by key
    assert cfg["output_dir"] == str(tmp_path / "o")
    user.write_text(yaml.safe_dump({"wdjt_lambda": 0.4}))
    with pytest.raises(SystemExit, match="unknown key 'wdjt_lambda'"):
        load_config(str(user))


def test_arithmetic_rows():
    rows = make_arithmetic_rows(50, max_operand=9, seed=3)
    assert rows == make_arithmetic_rows(50, max_operand=9, seed=3)
    assert [r["idx"] for r in rows] == list(range(50))
    for r in rows:
        question, answer = r["prompt"][0]["content"], r["completion"][0]["content"]
        assert question.endswith("=") and int(answer) == eval(question[:-1])  # noqa: S307 - digits and +/- only
    from wmss_trl.toy import build_char_tokenizer

    tok = build_char_tokenizer()
    text = "".join(r["prompt"][0]["content"] + r["completion"][0]["content"] for r in rows)
    assert tok.unk_token_id not in tok(text)["input_ids"]  # the toy tokenizer covers the task


# ------------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    config = write_config(root / "small.yaml")
    out = root / "run"
    stdout = ok(run_pipeline(config, out))
    return {"config": config, "dir": out, "stdout": stdout}


@pytest.mark.slow
def test_pipeline_end_to_end(pipeline_run):
    run, stdout = pipeline_run["dir"], pipeline_run["stdout"]
    for phase in PHASES:
        assert (run / "markers" / f"{phase}.done.json").exists(), phase
        assert f"{phase}: done" in stdout
    base, strong, final = weights(run / "base"), weights(run / "strong"), weights(run / "final")
    # phase 1 trained the strong model, WD-JT trained it further; the weak (base) model is untouched
    assert any(not torch.equal(base[k], strong[k]) for k in base)
    assert any(not torch.equal(strong[k], final[k]) for k in strong)
    assert (run / "final" / "tokenizer.json").exists()

    h0, h1 = entropy_rows(run / "entropy" / "weak.jsonl"), entropy_rows(run / "entropy" / "strong.jsonl")
    assert sorted(h0) == sorted(h1) == list(range(64))
    # SFT makes the model more certain on its training data: H1 < H0 on average
    assert np.mean([h1[i]["entropy_1"] for i in h1]) < np.mean([h0[i]["entropy_0"] for i in h0]) - 0.5

    merged = entropy_rows(run / "wd_ds" / "entropy.jsonl")
    w = np.array([merged[i]["wd_ds_weight"] for i in range(64)])
    assert w.sum() == pytest.approx(1.0) and w.std() > 0
    summary = json.loads((run / "wd_ds" / "summary.json").read_text())
    # the WD-JT trainer drew the same rows as the WD-DS summary (same weights, same seed) and logged the count
    assert f'"unique_samples": {summary["unique_samples_in_resample"]}' in stdout
    assert 0 < summary["unique_samples_in_resample"] < 64
    log = json.loads((run / "markers" / "wdjt.done.json").read_text())
    assert log["final_model"] == str(run / "final")


@pytest.mark.slow
def test_pipeline_rerun_skips_finished_phases(pipeline_run):
    run = pipeline_run["dir"]
    before = {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}
    stdout = ok(run_pipeline(pipeline_run["config"], run))
    for phase in PHASES:
        assert f"{phase}: complete, skipped" in stdout
    assert "running" not in stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()} == before


@pytest.mark.slow
def test_pipeline_resumes_after_interrupted_phase(pipeline_run, tmp_path):
    """A crash during the strong-entropy pass: half of its rows written, no marker for it or the later phases, no
    final model. The re-run skips phases 1 and H0, resumes H1 from its file, and reproduces the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["dir"], run)
    ent = run / "entropy" / "strong.jsonl"
    lines = ent.read_text().splitlines(keepends=True)
    ent.write_text("".join(lines[:32]) + lines[32][:7])  # 32 rows + a torn line
    meta = json.loads(Path(f"{ent}.meta.json").read_text())
    Path(f"{ent}.meta.json").write_text(json.dumps({**meta, "complete": False}))
    for phase in ("entropy_strong", "wd_ds", "wdjt"):
        (run / "markers" / f"{phase}.done.json").unlink()
    shutil.rmtree(run / "final")
    strong_before = (run / "strong" / "model.safetensors").stat().st_mtime_ns

    stdout = ok(run_pipeline(pipeline_run["config"], run))
    for phase in ("base", "data", "sft", "entropy_weak"):
        assert f"{phase}: complete, skipped" in stdout
    assert "resuming, 32 of 64 samples already scored" in stdout
    assert (run / "strong" / "model.safetensors").stat().st_mtime_ns == strong_before  # phase 1 not re-run
    original = entropy_rows(pipeline_run["dir"] / "entropy" / "strong.jsonl")
    resumed = entropy_rows(ent)
    assert sorted(resumed) == list(range(64))
    for i in range(64):
        assert resumed[i]["entropy_1"] == pytest.approx(original[i]["entropy_1"], abs=1e-6)
    final, reference = weights(run / "final"), weights(pipeline_run["dir"] / "final")
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------
def test_refuses_another_runs_output_dir(pipeline_run, tmp_path, capsys):
    other = {**SMALL, "toy_data": {"num_samples": 64, "max_operand": 20, "seed": 7}}
    config = write_config(tmp_path / "other.yaml", other)
    with pytest.raises(SystemExit, match=r"holds another WMSS pipeline run \(different toy_data\)"):
        main(["--config", config, "--output_dir", str(pipeline_run["dir"])])
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a WMSS pipeline run folder"):
        main(["--config", config, "--output_dir", str(stray)])


def test_refuses_weak_strong_pair_with_different_tokenizers(tmp_path):
    from wmss_trl.toy import DEFAULT_CHARS, build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    other_tok = build_char_tokenizer(DEFAULT_CHARS[::-1])  # same size, different token -> id map
    assert len(tok) == len(other_tok) and tok.get_vocab() != other_tok.get_vocab()
    base = save_model_and_tokenizer(build_tiny_model(tok, hidden_size=16, num_layers=1), tok, str(tmp_path / "b"))
    strong = save_model_and_tokenizer(
        build_tiny_model(other_tok, hidden_size=16, num_layers=1), other_tok, str(tmp_path / "s")
    )
    config = write_config(tmp_path / "c.yaml", {**SMALL, "base_model": base, "strong_model": strong})
    with pytest.raises(SystemExit, match="cannot be paired: .*tokenizer"):
        main(["--config", config, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "markers" / "entropy_weak.done.json").exists()


def test_refused_under_accelerate_launch(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="launches every phase itself"):
        main(["--print_config"])


# ------------------------------------------------------------------------------------------------------------------
# Every phase under accelerate launch (2 processes, DeepSpeed ZeRO-3)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_two_processes_zero3(pipeline_run, tmp_path):
    run = tmp_path / "run"
    stdout = ok(run_pipeline(pipeline_run["config"], run, "--launch_config", "zero3", timeout=1500))
    assert "phase 1 SFT: 2 process(es), DEEPSPEED" in stdout
    assert stdout.count("wmss entropy: 2 process(es), DEEPSPEED") == 2
    assert "wmss sft: 2 process(es), DEEPSPEED" in stdout
    for phase in PHASES:
        assert (run / "markers" / f"{phase}.done.json").exists(), phase
    # the same base model and data: H0 is the single-process H0 (sharded scoring changes nothing)
    single = entropy_rows(pipeline_run["dir"] / "entropy" / "weak.jsonl")
    sharded = entropy_rows(run / "entropy" / "weak.jsonl")
    for i in range(64):
        assert sharded[i]["entropy_0"] == pytest.approx(single[i]["entropy_0"], abs=1e-6)
    # ZeRO-3 saved full (gathered) weights: the strong and final models load and were trained
    base, strong, final = weights(run / "base"), weights(run / "strong"), weights(run / "final")
    assert {k: v.shape for k, v in strong.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(base[k], strong[k]) for k in base)
    assert any(not torch.equal(strong[k], final[k]) for k in strong)
    h0 = np.mean([r["entropy_0"] for r in sharded.values()])
    h1 = np.mean([r["entropy_1"] for r in entropy_rows(run / "entropy" / "strong.jsonl").values()])
    assert h1 < h0 - 0.5


# ------------------------------------------------------------------------------------------------------------------
# One writer, children die with the driver, provenance of reused phases, checkpoint formats
# ------------------------------------------------------------------------------------------------------------------
def _given_models_config(tmp_path, num_samples):
    """Base and strong models and a dataset given by the user (phase 1 skipped), so the entropy phase starts fast."""
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    base = save_model_and_tokenizer(
        build_tiny_model(tok, hidden_size=64, num_layers=2, seed=1), tok, str(tmp_path / "b")
    )
    strong = save_model_and_tokenizer(
        build_tiny_model(tok, hidden_size=64, num_layers=2, seed=2), tok, str(tmp_path / "s")
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(num_samples, max_operand=20)))
    cfg = {
        **SMALL,
        "base_model": base,
        "strong_model": strong,
        "dataset": str(data),
        "entropy": {"per_device_eval_batch_size": 2, "write_every": 16},
        "wdjt": {"max_steps": 1},
    }
    return write_config(tmp_path / "given.yaml", cfg)


def _pipeline_cmd(config, output_dir):
    return [sys.executable, "-m", "wmss_trl.cli", "pipeline", "--config", config, "--output_dir", str(output_dir)]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _descendants(pid) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            out += kids
            todo += kids
    return sorted(set(out))


def _alive(pid) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("launch", [None, pytest.param("ddp", marks=pytest.mark.distributed)])
def test_killed_driver_leaves_no_writer_and_the_rerun_resumes_exactly(tmp_path, launch):
    """SIGKILL of the driver only (not its group) during the entropy phase: its child dies with it (under
    `accelerate launch`: the launcher and its workers, the writer being rank 0's worker), the re-run at once resumes,
    and the entropy files hold exactly one row per sample. While that re-run lives, a second run on the folder is
    refused, naming its pid."""
    n = 3000
    config = _given_models_config(tmp_path, n)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ent = run / "entropy" / "weak.jsonl"
    first_log, rerun_log = open(tmp_path / "first.log", "w"), open(tmp_path / "rerun.log", "w")
    extra = ["--launch_config", launch] if launch else []
    driver = subprocess.Popen(
        _pipeline_cmd(config, run) + extra,
        stdout=first_log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    family, rerun = [], None
    try:
        _wait_for(lambda: ent.exists() and ent.stat().st_size > 0, 600, "the first entropy rows")
        child = json.loads(Path(f"{ent}.lock").read_text())["pid"]  # the writer named in the entropy file's lock
        family = _descendants(driver.pid)  # the phase process, and under accelerate the launcher and its workers
        assert child in family and len(family) == (1 if launch is None else 3), family
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its child is in the same new session, not signalled
        driver.wait()
        assert not json.loads(Path(f"{ent}.meta.json").read_text())["complete"], "killed too late: use more samples"
        _wait_for(lambda: not any(map(_alive, family)), 10, f"the orphaned phase processes {family} to exit")
        rows_at_kill = len(ent.read_text().splitlines())
        assert 0 < rows_at_kill < n

        rerun = subprocess.Popen(
            _pipeline_cmd(config, run) + extra,
            stdout=rerun_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        _wait_for(lambda: "running" in (tmp_path / "rerun.log").read_text(), 300, "the re-run to start its phases")
        second = subprocess.run(
            _pipeline_cmd(config, run), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert rerun.poll() is None, "the re-run ended before the concurrent run was tried: use more samples"
        assert second.returncode != 0
        assert f"being written by another process (pid {rerun.pid} " in second.stderr, second.stderr[-3000:]
        assert rerun.wait(timeout=1200) == 0, (tmp_path / "rerun.log").read_text()[-6000:]
    finally:
        for proc in (driver, rerun):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for pid in family:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        first_log.close()
        rerun_log.close()
    stdout = (tmp_path / "rerun.log").read_text()
    assert f"resuming, {rows_at_kill} of {n} samples already scored" in stdout
    for which in ("weak", "strong"):
        idx = [json.loads(line)["idx"] for line in (run / "entropy" / f"{which}.jsonl").read_text().splitlines()]
        assert len(idx) == n and sorted(idx) == list(range(n)), which
    assert (run / "markers" / "wdjt.done.json").exists()


def test_pickle_only_base_fails_before_any_phase(tiny, tmp_path):
    from wmss_trl.recipes.pipeline import main

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny["tokenizer"].save_pretrained(folder)
    config = write_config(tmp_path / "c.yaml", {**SMALL, "base_model": str(folder)})
    with pytest.raises(SystemExit, match="base_model checkpoint .*pickle weights only.*safetensors"):
        main(["--config", config, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before the run folder, and any phase, was made
    config = write_config(tmp_path / "c.yaml", {**SMALL, "strong_model": str(folder)})
    with pytest.raises(SystemExit, match="strong_model checkpoint .*pickle weights only"):
        main(["--config", config, "--output_dir", str(tmp_path / "run")])


@pytest.mark.slow
def test_reused_phases_are_checked_against_what_made_them(pipeline_run, tmp_path):
    """A finished phase whose output (or input) changed since it was marked done is not reused: the re-run stops
    before launching anything, naming the phase, the artefact and the field, and says how to redo it."""
    from wmss_trl.recipes.pipeline import main

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["dir"], run)
    shutil.copy(run / "base" / "model.safetensors", run / "strong" / "model.safetensors")  # other strong weights
    with pytest.raises(
        SystemExit,
        match=r"phase 'sft' \(outputs\).*strong\.weights\.model\.safetensors\..*"
        r"Delete .*markers/sft\.done\.json and the markers of the later phases",
    ):
        main(["--config", pipeline_run["config"], "--output_dir", str(run)])

    shutil.rmtree(run)
    shutil.copytree(pipeline_run["dir"], run)
    ent = run / "entropy" / "weak.jsonl"
    rows = [json.loads(line) for line in ent.read_text().splitlines()]
    rows[0]["entropy_0"] += 1.0
    ent.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"phase 'entropy_weak' \(outputs\).*entropy_weak\.sha256"):
        main(["--config", pipeline_run["config"], "--output_dir", str(run)])
    assert (run / "logs" / "wdjt.log").read_text().count("\n$ ") == 1  # nothing was launched again


# ------------------------------------------------------------------------------------------------------------------
# The flat form (TRL's keys at the top level) and the documented sections (issue 15, item 10)
# ------------------------------------------------------------------------------------------------------------------
FLAT = {
    "output_dir": "runs/flat",
    "model_name_or_path": "base",
    "dataset_name": "data.jsonl",
    "learning_rate": 1.0e-5,
    "max_length": 48,
    "bf16": False,
    "gradient_accumulation_steps": 2,  # SFTConfig
    "mixing_lambda": 0.3,
    "mixing_chunk_size": 256,  # WMSSSFTConfig only
    "selection_alpha": 0.2,
    "selection_beta": 0.7,
    "selection_gamma": 0.1,  # WD-DS
    "entropy_chunk_size": 256,
    "accelerate_config": "ddp",
    "num_processes": 2,
    "wdjt": {"num_train_epochs": 3, "learning_rate": 2.0e-5},  # a section in the same file wins over its flat keys
}
SECTIONED = {
    "output_dir": "runs/flat",
    "base_model": "base",
    "dataset": "data.jsonl",
    "sft": {"learning_rate": 1.0e-5, "max_length": 48, "bf16": False, "gradient_accumulation_steps": 2},
    "wdjt": {
        "learning_rate": 2.0e-5,
        "max_length": 48,
        "bf16": False,
        "gradient_accumulation_steps": 2,
        "mixing_lambda": 0.3,
        "mixing_chunk_size": 256,
        "num_train_epochs": 3,
    },
    "selection": {"selection_alpha": 0.2, "selection_beta": 0.7, "selection_gamma": 0.1},
    "entropy": {"entropy_chunk_size": 256},
    "launch": {"accelerate_config": "ddp", "num_processes": 2},
}


def test_flat_config_resolves_like_its_sectioned_equivalent(tmp_path):
    from wmss_trl.recipes.pipeline import Run, entropy_config, training_config

    flat = load_config(write_config(tmp_path / "flat.yaml", FLAT))
    assert flat == load_config(write_config(tmp_path / "sectioned.yaml", SECTIONED))
    # what each phase receives: the flat SFTConfig keys reach both trainings and, through WD-JT, the entropy passes
    (tmp_path / "configs").mkdir()
    run = Run({**flat, "output_dir": str(tmp_path)})
    sft, wdjt = training_config(run, "sft"), training_config(run, "wdjt")
    assert sft["learning_rate"] == 1.0e-5 and wdjt["learning_rate"] == 2.0e-5
    assert sft["max_length"] == wdjt["max_length"] == 48 and "mixing_lambda" not in sft
    assert wdjt["mixing_lambda"] == 0.3
    assert flat["selection"]["selection_mode"] == "resample"  # merged with the default
    entropy = yaml.safe_load(open(entropy_config(run)))
    assert entropy["max_length"] == 48 and entropy["entropy_chunk_size"] == 256


def test_flat_keys_that_fit_no_section_or_several_are_refused(tmp_path):
    cases = {
        "per_device_eval_batch_size": "ambiguous key 'per_device_eval_batch_size' in .*: it fits several sections "
        r"\(`sft \+ wdjt` or `entropy`\)",
        "hidden_size": "unknown key 'hidden_size' in .*: it fits no section",
        "weak_model_name_or_path": "'weak_model_name_or_path' in .* is set by the pipeline .*`base_model`",
    }
    for key, message in cases.items():
        path = write_config(tmp_path / f"{key}.yaml", {key: 8})
        with pytest.raises(SystemExit, match=message) as err:
            load_config(path)
        if "section" in message:
            assert "Sections: toy_model, toy_data, launch, common, sft, entropy, selection, wdjt" in str(err.value)
    with pytest.raises(SystemExit, match="sets both 'model_name_or_path' and 'base_model'"):
        load_config(write_config(tmp_path / "both.yaml", {"model_name_or_path": "a", "base_model": "b"}))


def test_pipeline_help_lists_the_sections_and_the_default():
    from wmss_trl.recipes.pipeline import DEFAULT_CONFIG

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "wmss_trl.cli", "pipeline", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    out = ok(proc)
    for section in ("toy_model", "toy_data", "launch", "common", "sft", "entropy", "selection", "wdjt"):
        assert f"\n  {section} " in out, section
    assert "Flat form: TRL's keys may also be given at the top level" in out
    assert DEFAULT_CONFIG.read_text() in out  # the embedded default, as the example


def test_flat_config_prints_and_runs(tmp_path):
    """`--print_config` of a flat file shows its sections; and a flat config drives a (tiny) run to the end."""
    flat = {
        "toy_model": SMALL["toy_model"],
        "toy_data": {"num_samples": 32, "max_operand": 20},
        "per_device_train_batch_size": 8,
        "max_length": 32,
        "logging_steps": 4,
        "num_train_epochs": 1,
        "mixing_lambda": 0.4,
        "entropy_chunk_size": 512,
    }
    config = write_config(tmp_path / "flat.yaml", flat)
    printed = yaml.safe_load(ok(run_pipeline(config, tmp_path / "p", "--print_config")))
    assert printed["wdjt"]["mixing_lambda"] == 0.4 and printed["sft"]["num_train_epochs"] == 1
    assert printed["entropy"]["entropy_chunk_size"] == 512
    out = ok(run_pipeline(config, tmp_path / "run"))
    assert "finished in" in out and os.path.isfile(tmp_path / "run" / "final" / "config.json")
    wdjt = yaml.safe_load(open(tmp_path / "run" / "configs" / "wdjt.yaml"))
    assert wdjt["mixing_lambda"] == 0.4 and wdjt["num_train_epochs"] == 1
