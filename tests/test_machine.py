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
