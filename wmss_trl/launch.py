"""Where the ``accelerate`` configs shipped with wmss_trl live, and how a ``--accelerate_config`` value resolves to one
(torch-free: the CLI imports it before any command runs)."""

from __future__ import annotations

from pathlib import Path


CONFIG_DIR = Path(__file__).parent / "accelerate_configs"


def resolve_accelerate_config(value: str) -> str:
    """``value`` itself when it is a file, else the shipped config of that name (``zero3`` -> ``zero3.yaml``)."""
    if Path(value).is_file():
        return value
    candidate = CONFIG_DIR / f"{value}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise SystemExit(f"--accelerate_config {value!r} is neither a file nor one of: {names}.")
    return str(candidate)
