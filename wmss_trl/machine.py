"""What a measurement ran on: CPU model and features, threads, load. Printed by every benchmark beside its figures.

Timings on this project's CPUs differ by machine (e.g. a bf16 weak model is cheap on a CPU with AVX512-BF16/AMX and
slow on one without), so a ratio means little without the machine that gave it.
"""

from __future__ import annotations

import os
import platform


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info() -> tuple[str, set[str]]:
    """``(CPU model name, CPU feature flags)`` from ``/proc/cpuinfo`` (empty flags where it cannot be read)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def machine_info() -> dict:
    """CPU model, logical CPUs, bf16 units, torch / OMP threads and the 1/5/15-minute load averages."""
    model, flags = cpu_info()
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "bf16_units": sorted(f for f in _BF16_FLAGS if f in flags),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def describe_machine(info: dict | None = None) -> str:
    """One line for a benchmark's output, e.g. ``machine: Intel Xeon, 2 CPUs (AVX512, bf16: amx_bf16), ...``."""
    info = machine_info() if info is None else info
    bf16 = ", ".join(info["bf16_units"]) or "none"
    load = "/".join(f"{x:.2f}" for x in info["load_avg"]) if info.get("load_avg") else "n/a"
    return (
        f"machine: {info['cpu']}, {info['logical_cpus']} CPUs ({info.get('torch_cpu_capability', '?')}, bf16 units: "
        f"{bf16}), torch threads {info.get('torch_threads', '?')}, OMP_NUM_THREADS={info['omp_num_threads']}, "
        f"load {load} (1/5/15 min)"
    )


def slow_bf16_warning(bf16: bool, on_cpu: bool) -> str | None:
    """The warning for ``bf16=True`` (TRL's default) on a CPU without bf16 units: torch then runs every bf16 matmul
    in software. Measured on this project's AMD EPYC (AVX2, no AVX512-BF16 / AMX): one SmolLM2-135M SFT step of 16
    short rows took 200 s in bf16 against 18 s in float32. None when the flags cannot be read (not Linux)."""
    if not (bf16 and on_cpu):
        return None
    model, flags = cpu_info()
    if not flags or any(f in flags for f in _BF16_FLAGS):
        return None
    return (
        f"bf16=True (TRL's default) on a CPU without bf16 units ({model}: no avx512_bf16 / amx_bf16): bf16 matmuls "
        "run in software, tens of times slower than float32. Pass --bf16 false unless you need bf16 numerics."
    )
