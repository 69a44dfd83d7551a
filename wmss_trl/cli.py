"""The ``wmss`` command: ``wmss <command> [--config run.yaml] [--flags ...]``.

Each command is a readable recipe in ``wmss_trl/recipes/`` exposing ``main(argv)``; flags and YAML configs are
parsed by TRL's ``TrlParser`` (same keys as ``trl sft|grpo|dpo``). Run it under ``accelerate launch``
(``accelerate launch --config_file ds_configs/zero3.yaml -m wmss_trl.cli sft --config run.yaml``), or let the
command relaunch itself: ``wmss sft --config run.yaml --accelerate_config zero3`` (a name from
``wmss_trl/accelerate_configs`` (ddp, zero2, zero3) or a path; ``--num_processes N`` overrides the config's).

``wmss <command> --help`` is answered from a cache after its first call (the flags are TRL's config dataclasses, and
importing them costs ~4 s: torch, transformers, peft): the text is stored in :func:`help_cache_dir` keyed by everything that shapes it (the package's source, the versions of the
libraries the configs come from, the terminal width), so a changed key regenerates it and a stale text is never shown.
The same cache makes an unknown flag an instant error with the nearest valid names.

The commands hide the pinned libraries' own deprecation notices (:data:`THIRD_PARTY_DEPRECATIONS`, each raised by
TRL, DeepSpeed or accelerate calling an old name inside its own code); set ``PYTHONWARNINGS=default`` (or pass
``python -W ...``) to see every warning.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from .launch import resolve_accelerate_config


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
    "weak-rollouts": (
        "wmss_trl.recipes.weak_rollouts",
        "Sample the weak model's rollouts once: a pool for GRPO and mining",
    ),
    "dpo": (
        "wmss_trl.recipes.dpo",
        "DPO with the weak checkpoint as reference (WMSSDPOTrainer), optional WD-JT and entropy-gap weights",
    ),
}

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


# Flags the `wmss` wrapper and TRL's parser take besides the dataclass fields listed by `--help`.
WRAPPER_FLAGS = ("--config", "--accelerate_config", "--num_processes")
HELP_LIBRARIES = ("trl", "transformers", "accelerate", "peft", "torch")


def _help_cache_path(command: str) -> Path:
    """Where ``wmss <command> --help`` is cached, named by a key over everything that shapes the text: the sha256 of
    every source file of the package, the versions of :data:`HELP_LIBRARIES`, Python's version and the terminal width
    argparse wraps at."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*")):
        if path.suffix in (".py", ".yaml") and path.is_file():
            digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    for name in HELP_LIBRARIES:
        digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
    digest.update(f"{sys.version}|{shutil.get_terminal_size().columns}".encode())
    return help_cache_dir() / f"{command}-{digest.hexdigest()[:16]}.json"


def help_cache_dir() -> Path:
    """``$WMSS_CACHE_DIR/help``, else ``$XDG_CACHE_HOME/wmss_trl/help``, else ``~/.cache/wmss_trl/help``."""
    if os.environ.get("WMSS_CACHE_DIR"):
        return Path(os.environ["WMSS_CACHE_DIR"]) / "help"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmss_trl" / "help"


def _read_help(command: str) -> dict | None:
    try:
        return json.loads(_help_cache_path(command).read_text())
    except (OSError, ValueError):
        return None


def _capture_help(command: str, module) -> dict:
    """Run the recipe's own ``--help`` (its parser prints and exits 0), store the text and its flags atomically, and
    return both. A cache that cannot be written (read-only home) is skipped silently: it only saves time."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.main(["--help"])
    text = out.getvalue()
    flags = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text)) | set(WRAPPER_FLAGS)
    if hasattr(module, "make_parser"):  # flags hidden from --help (e.g. the pipeline's internal --phase) are valid too
        flags |= {option for action in module.make_parser()._actions for option in action.option_strings}
    entry = {"help": text, "flags": sorted(flags)}
    path = _help_cache_path(command)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    return entry


def unknown_flags(argv: list[str], flags: list[str]) -> list[str]:
    """The ``--name`` / ``--name=value`` tokens of ``argv`` that match no flag, not even as a prefix (argparse accepts
    an unambiguous prefix, so a prefix is left to the parser)."""
    given = [token.split("=", 1)[0] for token in argv if token.startswith("--")]
    return [flag for flag in given if not any(known.startswith(flag) for known in flags)]


def unknown_flags_message(command: str, unknown: list[str], flags: list[str]) -> str:
    """``wmss <command>: error: unknown flag --x (did you mean --y?)``, one line per flag, then where to look."""
    lines = []
    for flag in unknown:
        close = difflib.get_close_matches(flag, flags, n=3, cutoff=0.6)
        lines.append(
            f"wmss {command}: error: unknown flag {flag}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    lines.append(f"`wmss {command} --help` lists them.")
    return "\n".join(lines)


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
    wants_help = any(token in ("-h", "--help") for token in rest)
    cached = _read_help(command)
    if cached is not None and wants_help:
        print(cached["help"], end="")
        return 0
    if cached is not None and (unknown := unknown_flags(rest, cached["flags"])):
        print(unknown_flags_message(command, unknown, cached["flags"]), file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        filter_third_party_deprecations()
        module = importlib.import_module(COMMANDS[command][0])
        if wants_help:
            print(_capture_help(command, module)["help"], end="")
            return 0
        try:
            return module.main(rest) or 0
        except ValueError as error:  # TrlParser's unknown-flag error (its text: a contract listed in trl_compat)
            entry = _capture_help(command, module) if "not used by the HfArgumentParser" in str(error) else None
            if entry is None or not (unknown := unknown_flags(rest, entry["flags"])):
                raise
            print(unknown_flags_message(command, unknown, entry["flags"]), file=sys.stderr)
            return 2


if __name__ == "__main__":
    code = main()  # first: `wmss demo` pins the numerics before anything imports torch
    from wmss_trl.recipes.common import exit_worker

    exit_worker(code)
