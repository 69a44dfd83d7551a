"""The pipeline's configuration: the embedded default with the user's YAML merged over it section by section (TRL's
keys may be given flat: [`flat_targets`] says where each goes), and the run's fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ...io import path_fingerprint, sha256_json


DEFAULT_CONFIG = Path(__file__).parent.with_name("pipeline_default.yaml")
SECTIONS = ("toy_model", "toy_data", "launch", "common", "sft", "entropy", "selection", "wdjt")
NOT_FINGERPRINTED = ("output_dir", "launch")
TOP_KEYS = ("output_dir", "base_model", "strong_model", "dataset")
FLAT_ALIASES = {"model_name_or_path": "base_model", "dataset_name": "dataset"}  # TRL's names of the top-level keys
PIPELINE_SET = {  # WMSSSFTConfig / trl keys the pipeline sets itself
    "weak_model_name_or_path": "the weak model is `base_model` (the base before phase 1)",
    "entropy_files": "the WD-DS phase writes them",
    "weak_entropy_column": "the entropy phases name it",
    "strong_entropy_column": "the entropy phases name it",
    "resume_from_checkpoint": "a re-run resumes by itself",
}
LAUNCH_KEYS = ("accelerate_config", "num_processes")
ENTROPY_KEYS = ("per_device_eval_batch_size", "idx_column", "write_every", "entropy_chunk_size")


def flat_targets(key: str) -> list[tuple[str, ...]]:
    """Where a flat (top-level, TRL-style) key goes; more than one entry means ambiguous, none unknown. The rule:

    accelerate_config, num_processes                      -> launch
    selection_* fields of WMSSSFTConfig                   -> selection
    the other WMSSSFTConfig fields that SFTConfig lacks   -> wdjt
    SFTConfig fields                                      -> sft and wdjt (both trainings; the entropy passes
                                                             follow WD-JT's masking fields and bf16)
    per_device_eval_batch_size and `wmss entropy`'s idx_column, write_every, entropy_chunk_size -> entropy
    """
    from dataclasses import fields

    from trl import SFTConfig

    from ...sft import WMSSSFTConfig

    sft_fields = {f.name for f in fields(SFTConfig)}
    wmss_fields = {f.name for f in fields(WMSSSFTConfig)} - sft_fields
    targets = []
    if key in LAUNCH_KEYS:
        targets.append(("launch",))
    if key in wmss_fields:
        targets.append(("selection",) if key.startswith("selection_") else ("wdjt",))
    if key in sft_fields:
        targets.append(("sft", "wdjt"))
    if key in ENTROPY_KEYS:
        targets.append(("entropy",))
    return targets


def sectioned(layer: dict, source: str) -> dict:
    """``layer`` with its flat keys (TRL's keys at the top level, as `trl sft` takes them) moved into the sections
    [`flat_targets`] names; a section the layer itself gives wins over its flat keys. SystemExit on a key that fits
    no section or several, naming the key and the sections."""
    out: dict = {}
    flat = {k: v for k, v in layer.items() if k not in TOP_KEYS and k not in SECTIONS}
    for key, value in flat.items():
        if key in FLAT_ALIASES:
            top = FLAT_ALIASES[key]
            if top in layer:
                raise SystemExit(f"{source} sets both {key!r} and {top!r} (the same setting); keep one.")
            out[top] = value
            continue
        if key in PIPELINE_SET:
            raise SystemExit(f"{key!r} in {source} is set by the pipeline ({PIPELINE_SET[key]}); remove it.")
        targets = flat_targets(key)
        if len(targets) != 1:
            where = " or ".join("`" + " + ".join(t) + "`" for t in targets)
            why = (
                f"ambiguous key {key!r} in {source}: it fits several sections ({where}); put it under the one you mean"
                if targets
                else f"unknown key {key!r} in {source}: it fits no section (it is neither a pipeline key, "
                f"{', '.join(TOP_KEYS)}, nor a field of TRL's SFTConfig, WMSSSFTConfig or `wmss entropy`)"
            )
            raise SystemExit(f"{why}. Sections: {', '.join(SECTIONS)} (see `wmss pipeline --help`).")
        for section in targets[0]:
            out.setdefault(section, {})[key] = value
    for key, value in layer.items():
        if key in flat:
            continue
        if key in SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


def load_config(path: str | None = None, overrides: dict | None = None) -> dict:
    """The embedded default, with the YAML file at ``path`` merged over it (section by section), then ``overrides``.
    A layer may give TRL's keys flat, at the top level: [`sectioned`] moves them into their sections first."""
    with open(DEFAULT_CONFIG) as f:
        cfg = yaml.safe_load(f)
    layers = []
    if path is not None:
        with open(path) as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise SystemExit(f"{path} must hold a YAML mapping.")
        layers.append((path, user))
    if overrides:
        layers.append(("command line", overrides))
    for source, layer in layers:
        for key, value in sectioned(layer, source).items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise SystemExit(f"{key!r} in {source} must be a mapping of fields.")
                cfg[key] = {**(cfg[key] or {}), **value}
            else:
                cfg[key] = value
    cfg["output_dir"] = os.path.abspath(cfg["output_dir"])
    for key in ("base_model", "strong_model", "dataset"):
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def run_fingerprint(cfg: dict) -> tuple[str, dict]:
    """What defines a run: the configuration (minus where it lives and how it is launched) and the fingerprints of the
    user-given base model, strong model (safetensors headers, sizes, mtimes) and dataset (content)."""
    ident = {k: v for k, v in cfg.items() if k not in NOT_FINGERPRINTED}
    for key in ("base_model", "strong_model", "dataset"):
        if cfg[key] is not None:
            if not os.path.exists(cfg[key]):
                raise SystemExit(f"{key} {cfg[key]!r} does not exist.")
            ident[f"{key}_content"] = path_fingerprint(cfg[key])
    return sha256_json(ident), ident


def write_yaml(path, obj) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=True)
    return str(path)


CONFIG_HELP = """\
The --config YAML is merged over the embedded default below, key by key inside each section. Its keys:

  output_dir, base_model, strong_model, dataset   the run folder, the weak model M_w (null: a tiny model built from
                                                  toy_model), an existing strong model (skips phase 1), the data
                                                  (null: generated from toy_data)
  toy_model        tiny Qwen2 built when base_model is null (wmss_trl.toy.build_tiny_model arguments)
  toy_data         arithmetic task generated when dataset is null (num_samples, max_operand, seed)
  launch           how each phase runs: accelerate_config (null | ddp | zero2 | zero3 | a path), num_processes
  common           TRL SFTConfig fields shared by phase 1 and WD-JT
  sft              SFTConfig fields of phase 1 only (plain TRL SFT, base -> strong)
  entropy          SFTConfig / `wmss entropy` fields of the entropy passes H0, H1 (they also take WD-JT's masking
                   fields and bf16)
  selection        WD-DS fields of WMSSSFTConfig (selection_mode, selection_alpha/beta/gamma, ...)
  wdjt             WMSSSFTConfig fields of WD-JT only (mixing_lambda, ...); sft and wdjt win over common

Flat form: TRL's keys may also be given at the top level, as `trl sft --config` takes them; each goes to its section:
  model_name_or_path -> base_model, dataset_name -> dataset; accelerate_config, num_processes -> launch;
  selection_* -> selection; other WMSSSFTConfig-only fields -> wdjt; SFTConfig fields -> sft and wdjt (both
  trainings); per_device_eval_batch_size, idx_column, write_every, entropy_chunk_size -> entropy.
A key that fits no section, or several (per_device_eval_batch_size: training eval or the entropy passes), is
refused, naming the sections; a section given in the same file wins over its flat keys. --print_config shows the
result. For example, this flat file

  output_dir: runs/qwen-math
  model_name_or_path: /models/Qwen3-4B-Base
  dataset_name: data/math.jsonl
  learning_rate: 1.0e-5
  mixing_lambda: 0.5

is the sectioned {output_dir: ..., base_model: ..., dataset: ..., sft: {learning_rate: 1.0e-5},
wdjt: {learning_rate: 1.0e-5, mixing_lambda: 0.5}}.

The embedded default (wmss_trl/recipes/pipeline_default.yaml):

"""
