"""The machine line every benchmark prints beside its figures."""

import os

from wmss_trl.machine import describe_machine, machine_info


def test_machine_info_reads_this_machine():
    info = machine_info()
    assert info["logical_cpus"] == os.cpu_count()
    assert info["cpu"]
    assert len(info["load_avg"]) == 3 and all(x >= 0 for x in info["load_avg"])
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert ("amx_bf16" in info["bf16_units"]) == ("amx_bf16" in text)
    line = describe_machine(info)
    assert line.startswith(f"machine: {info['cpu']}, {os.cpu_count()} CPUs") and "load " in line


def test_slow_bf16_warning_only_on_a_cpu_without_bf16_units(monkeypatch):
    """TRL defaults to bf16=True; on a CPU without bf16 units the recipes warn, naming the fix."""
    import wmss_trl.machine as machine

    monkeypatch.setattr(machine, "cpu_info", lambda: ("AMD EPYC", {"avx2", "fma"}))
    message = machine.slow_bf16_warning(bf16=True, on_cpu=True)
    assert "AMD EPYC" in message and "--bf16 false" in message
    assert machine.slow_bf16_warning(bf16=False, on_cpu=True) is None
    assert machine.slow_bf16_warning(bf16=True, on_cpu=False) is None  # a GPU run
    monkeypatch.setattr(machine, "cpu_info", lambda: ("Intel Xeon", {"avx2", "amx_bf16"}))
    assert machine.slow_bf16_warning(bf16=True, on_cpu=True) is None
    monkeypatch.setattr(machine, "cpu_info", lambda: ("unknown", set()))  # flags not readable: no guess
    assert machine.slow_bf16_warning(bf16=True, on_cpu=True) is None


def test_recipes_warn_about_software_bf16(monkeypatch, tiny, tmp_path, caplog):
    """`wmss sft` with TRL's default bf16=True on such a CPU logs the warning before any model loads."""
    from types import SimpleNamespace

    import wmss_trl.machine as machine
    from wmss_trl.recipes.common import check_before_loading

    monkeypatch.setattr(machine, "cpu_info", lambda: ("AMD EPYC", {"avx2"}))
    model_args = SimpleNamespace(model_name_or_path=tiny["strong"])
    training_args = SimpleNamespace(
        bf16=True, use_cpu=True, process_index=0, resume_from_checkpoint=None, output_dir=str(tmp_path)
    )
    with caplog.at_level("WARNING"):
        check_before_loading(model_args, training_args)
    assert "bf16 matmuls run in software" in caplog.text
