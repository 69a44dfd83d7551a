"""Reproducible numerics for ``wmss demo``: the kernel code paths pinned before torch loads, and what decides the
numerics of a run (recorded with its checkpoints and results)."""

from __future__ import annotations

import os
import platform
import sys
import warnings


# Kernel code paths every Intel x86-64 CPU with AVX2 has, and one thread. Read by the libraries when their first
# kernel runs, so they must be in the environment before then (before torch is imported, to be safe).
NUMERICS_PINS = {
    "MKL_CBWR": "AVX2",  # oneMKL conditional numerical reproducibility: the AVX2 code branch (BLAS: every matmul)
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels: the AVX2 build (softmax, norms, adds...)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels: at most AVX2 (no AVX-512 / AMX)
    "OMP_NUM_THREADS": "1",  # one thread: MKL's reproducibility holds for a fixed thread count only
}


def _has_avx2() -> bool:
    """x86-64 with AVX2 and FMA (what ATen's and MKL's AVX2 code paths execute)."""
    from ...machine import cpu_info

    _, flags = cpu_info()
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags


def pin_numerics() -> dict[str, str]:
    """Put :data:`NUMERICS_PINS` into ``os.environ`` where the user has not set the variable; call it before torch
    runs its first kernel (the libraries choose their code paths once, then).

    Rule: a variable already set is the user's and is kept; the others get the pinned value. On a CPU without AVX2
    (or not x86-64, e.g. aarch64) only the thread count is pinned: the other paths do not exist there. Returns
    ``{variable: "value (source)"}`` for the header. Warns that the table may differ from README's when a user's
    value differs from the pin, or when torch had already chosen other ATen kernels before the pins were set.
    """
    avx2 = _has_avx2()
    state, pinned, differ = {}, [], []
    for name, value in NUMERICS_PINS.items():
        if name in os.environ:
            state[name] = f"{os.environ[name]} (yours)"
            if os.environ[name] != value:
                differ.append(f"{name}={os.environ[name]} (the demo's: {value})")
        elif avx2 or name == "OMP_NUM_THREADS":
            os.environ[name] = value
            pinned.append(name)
            state[name] = f"{value} (pinned by the demo)"
        else:
            state[name] = f"unset (not pinned: no AVX2 on this {platform.machine()} CPU)"
    if differ:
        warnings.warn(f"your {', '.join(differ)}: kept, but the table may differ from README's.", stacklevel=2)
    if "torch" in sys.modules and "ATEN_CPU_CAPABILITY" in pinned:
        in_effect = sys.modules["torch"].backends.cpu.get_cpu_capability()
        if in_effect.lower() != NUMERICS_PINS["ATEN_CPU_CAPABILITY"]:
            warnings.warn(
                f"torch ran kernels before `wmss demo` pinned the numerics ({', '.join(pinned)}): ATen's kernels in "
                f"effect are {in_effect}, so the table may differ from README's. Run `wmss demo` in a fresh process, "
                f"or export {' '.join(f'{k}={NUMERICS_PINS[k]}' for k in pinned)} before starting Python.",
                stacklevel=2,
            )
    return state


def numerics_in_effect(pins: dict[str, str] | None = None) -> dict:
    """What decides the numerics of this run (recorded with the checkpoints and the results): the pin variables
    (with their source from :func:`pin_numerics` when it ran), the torch version (which fixes the bundled oneMKL and
    oneDNN), ATen's kernels in effect and the thread count."""
    import torch

    values = {name: os.environ.get(name, "unset") for name in NUMERICS_PINS}
    return {
        "variables": values,
        "sources": pins or {name: f"{v} (environment)" for name, v in values.items()},
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
