"""Noise: `wmss` commands ignore the pinned libraries' own deprecation notices (and only those); `import wmss_trl`
never touches the user's warning filters; a user's -W / PYTHONWARNINGS wins."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from wmss_trl import cli


def raise_each_listed_notice(tmp_path):
    """Raise, for real, each notice the pinned libraries emit at the places :data:`THIRD_PARTY_DEPRECATIONS` names."""
    import torch.distributed as dist
    from trl import GRPOConfig

    from wmss_trl.toy import build_char_tokenizer, build_tiny_model

    model = build_tiny_model(build_char_tokenizer(), seed=0)
    model.gradient_checkpointing_enable()  # transformers.modeling_utils, as TRL's helpers call it
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # TRL's default gradient_checkpointing=True
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:  # the old collective names, as DeepSpeed's ZeRO-3 and accelerate's gather call them
        out, x = torch.zeros(2), torch.ones(2)
        dist.all_gather_into_tensor(out, x)
        dist.reduce_scatter_tensor(x, out)
    finally:
        dist.destroy_process_group()


def recorded(tmp_path, filtered: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if filtered:
            cli.filter_third_party_deprecations()
        raise_each_listed_notice(tmp_path)
    return [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_each_filter_silences_its_real_notice_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    unfiltered = recorded(tmp_path, filtered=False)
    for pattern in (
        "`is_gradient_checkpointing`",
        "`gradient_checkpointing_enable`",
        "`gradient_checkpointing_disable`",
        "`gradient_checkpointing` is",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
    ):
        assert any(pattern in m for m in unfiltered), (pattern, unfiltered)  # the libraries do raise them
    assert recorded(tmp_path, filtered=True) == []
    # a filter names its module: the same text raised from elsewhere (e.g. our own code) is still shown
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.filter_third_party_deprecations()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert len(caught) == 1


def test_user_warning_options_win(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    before = list(warnings.filters)
    with warnings.catch_warnings():
        cli.filter_third_party_deprecations()
        assert warnings.filters == before


def test_import_leaves_warning_filters_unchanged():
    """`import wmss_trl` adds no filter; nor does importing every module of the package once the libraries it builds
    on are imported (torch and numpy add their own filters on import: theirs, not ours)."""
    code = textwrap.dedent("""
        import importlib, pkgutil, warnings
        before = list(warnings.filters)
        import wmss_trl
        assert warnings.filters == before, warnings.filters
        import accelerate, datasets, deepspeed, numpy, peft, torch, transformers, trl
        before = list(warnings.filters)
        names = [m.name for m in pkgutil.walk_packages(wmss_trl.__path__, "wmss_trl.")]
        assert "wmss_trl.cli" in names and "wmss_trl.recipes.common" in names, names
        for name in names:
            importlib.import_module(name)
        assert warnings.filters == before, [f for f in warnings.filters if f not in before]
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_main_restores_the_callers_filters(monkeypatch):
    """`cli.main` called from Python (a notebook, a test) gives the caller's filters back when the command ends."""
    seen = {}

    def command(argv):
        seen["during"] = list(warnings.filters)
        return 0

    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.setitem(cli.COMMANDS, "probe", ("wmss_trl.recipes.sft", "probe"))
    import wmss_trl.recipes.sft

    monkeypatch.setattr(wmss_trl.recipes.sft, "main", command)
    before = list(warnings.filters)
    assert cli.main(["probe"]) == 0
    assert warnings.filters == before and len(seen["during"]) == len(before) + len(cli.THIRD_PARTY_DEPRECATIONS)


def write_grpo_run(tmp_path, tiny):
    import json

    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)}) + "\n")
    config = tmp_path / "run.yaml"
    # no activation_checkpointing key: TRL's default (gradient_checkpointing=True) is what raises the notices
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\ndataset_name: {data}\nreward_funcs: [numeric_accuracy_reward]\n"
        "max_steps: 2\nper_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
        "report_to: none\nbf16: false\nlogging_steps: 1\nsave_strategy: 'no'\n"
    )
    return config


@pytest.mark.slow
def test_command_stderr_has_no_deprecation_noise(tiny, tmp_path):
    config = write_grpo_run(tmp_path, tiny)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def grpo(out, **extra_env):
        cmd = [
            sys.executable,
            "-m",
            "wmss_trl.cli",
            "grpo",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **extra_env})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stderr

    quiet = grpo("quiet")
    noisy = [line for line in quiet.splitlines() if "FutureWarning" in line or "DeprecationWarning" in line]
    assert noisy == []
    # the same run with the user's own policy shows the notices: the sources fire in this run, the user's -W wins
    loud = grpo("loud", PYTHONWARNINGS="default")
    assert "`is_gradient_checkpointing` is deprecated" in loud and "`gradient_checkpointing` is deprecated" in loud
