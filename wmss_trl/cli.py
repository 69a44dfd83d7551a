"""The ``wmss`` command: ``wmss <command> [--config run.yaml] [--flags ...]``.

Each command is a readable recipe in ``wmss_trl/recipes/`` exposing ``main(argv)``; flags and YAML configs are
parsed by TRL's ``TrlParser`` (same keys as ``trl sft|grpo|dpo``). Run it under ``accelerate launch``
(``accelerate launch --config_file ds_configs/zero3.yaml -m wmss_trl.cli sft --config run.yaml``), or let the
command relaunch itself: ``wmss sft --config run.yaml --accelerate_config zero3`` (a name from
``wmss_trl/accelerate_configs`` (ddp, zero2, zero3) or a path; ``--num_processes N`` overrides the config's).

The commands hide the pinned libraries' own deprecation notices (:data:`THIRD_PARTY_DEPRECATIONS`, each raised by
TRL, DeepSpeed or accelerate calling an old name inside its own code); set ``PYTHONWARNINGS=default`` (or pass
``python -W ...``) to see every warning.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path


COMMANDS = {
    "demo": (
        "wmss_trl.recipes.demo",
        "the embedded demo: weak -> strong -> SFT / NEFTune / WMSS / GRPO / WMSS-GRPO, table + plot",
    ),
    "compare": (
        "wmss_trl.recipes.compare",
        "WMSS-GRPO vs vanilla GRPO on your config: seeds, pass@k, CIs, table + plots",
    ),
    "sft": ("wmss_trl.recipes.sft", "WD-JT: SFT on weak/strong mixed logits (WMSSSFTTrainer)"),
    "grpo": (
        "wmss_trl.recipes.grpo",
        "GRPO with the weak checkpoint as reference, negatives and entropy anchor (WMSSGRPOTrainer); --vanilla for TRL's GRPO",
    ),
    "entropy": (
        "wmss_trl.recipes.entropy",
        "WD-DS: per-sample mean token entropy of a model on a dataset (resumable)",
    ),
    "pipeline": (
        "wmss_trl.recipes.pipeline",
        "The whole WMSS recipe (SFT, entropies, WD-DS, WD-JT), resumable; --config YAML",
    ),
    "mine-negatives": (
        "wmss_trl.recipes.mine_negatives",
        "Weak model's verified-wrong, plausible answers as DPO rejected responses",
    ),
    "dpo": (
        "wmss_trl.recipes.dpo",
        "DPO with the weak checkpoint as reference (WMSSDPOTrainer), optional WD-JT and entropy-gap weights",
    ),
}

CONFIG_DIR = Path(__file__).parent / "accelerate_configs"

# Deprecation notices raised inside the pinned libraries by the libraries themselves, silenced in `wmss` commands
# only (never on `import wmss_trl`: a library does not change its user's warning filters). A user cannot act on any
# of them, and each deprecated name still does exactly what its new name does. (message regex, category, module
# the warning is attributed to, where it comes from).
THIRD_PARTY_DEPRECATIONS = (
    (
        r"`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        r"transformers\.modeling_utils\Z",
        "TRL 1.16's trl/models/utils.py (`unwrap_model_for_generation`, `disable_gradient_checkpointing`, called by "
        "TRL's trainers and ours around every generation) reads transformers 5's deprecated alias of "
        "`is_activation_checkpointing`, which returns the same value",
    ),
    (
        r"`gradient_checkpointing_(enable|disable)` is deprecated",
        FutureWarning,
        r"transformers\.modeling_utils\Z",
        "the same TRL helpers call transformers 5's deprecated aliases of `activation_checkpointing_enable/disable`",
    ),
    (
        r"`gradient_checkpointing` is deprecated",
        FutureWarning,
        r"transformers\.training_args\Z",
        "TRL 1.16's configs default `gradient_checkpointing=True` (trl/trainer/base_config.py), which transformers 5 "
        "copies to `activation_checkpointing` with this notice: the value is honoured",
    ),
    (
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger\Z",
        "DeepSpeed 0.19 (deepspeed/comm/torch.py, every ZeRO-3 gather and reduce) and accelerate 1.15 "
        "(utils/operations.py `gather`) call torch 2.13's old names of `all_gather_single` / `reduce_scatter_single`",
    ),
)


def filter_third_party_deprecations() -> None:
    """Ignore the :data:`THIRD_PARTY_DEPRECATIONS` notices, unless the user set their own warning policy
    (``python -W ...`` or ``PYTHONWARNINGS``, which reach the launched processes too): then theirs rules.

    Ignored, not shown once: each is raised again at every step, in every process, and says nothing a ``wmss`` user
    can change. Call it inside ``warnings.catch_warnings()`` so that a caller's filters come back afterwards.
    """
    if sys.warnoptions:
        return
    for message, category, module, _source in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def resolve_accelerate_config(value: str) -> str:
    if Path(value).is_file():
        return value
    candidate = CONFIG_DIR / f"{value}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise SystemExit(f"--accelerate_config {value!r} is neither a file nor one of: {names}.")
    return str(candidate)


def _pop_flag(argv: list[str], name: str) -> str | None:
    if name not in argv:
        return None
    i = argv.index(name)
    if i + 1 >= len(argv):
        raise SystemExit(f"{name} needs a value.")
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def relaunch(command: str, argv: list[str], config: str, num_processes: str | None) -> int:
    """Re-run ``wmss <command> argv`` under ``accelerate launch --config_file config``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", resolve_accelerate_config(config)]
    if num_processes is not None:
        launch += ["--num_processes", num_processes]
    launch += ["-m", "wmss_trl.cli", command, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(launch, env=env)


def usage() -> str:
    lines = [
        "usage: wmss <command> [--config run.yaml] [--accelerate_config ddp|zero2|zero3|PATH] [flags]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`wmss <command> --help` lists the flags of a command (TRL's config fields plus the WMSS ones)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    config = _pop_flag(rest, "--accelerate_config") if command != "compare" else None  # compare launches its runs
    num_processes = _pop_flag(rest, "--num_processes") if config is not None else None
    if config is not None and "LOCAL_RANK" not in os.environ:
        return relaunch(command, rest, config, num_processes)
    with warnings.catch_warnings():
        filter_third_party_deprecations()
        module = importlib.import_module(COMMANDS[command][0])
        return module.main(rest) or 0


if __name__ == "__main__":
    code = main()  # first: `wmss demo` pins the numerics before anything imports torch
    from wmss_trl.recipes.common import exit_worker

    exit_worker(code)
